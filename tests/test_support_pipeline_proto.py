"""Our generated pipeline proto talks to Paddle Serving 0.9's REAL PipelineClient.

A throwaway grpc.aio server (and a throwaway HTTP JSON endpoint) built only on
serving/proto answers in the shape of Paddle Serving's OCR pipeline example;
tests/tools/ps_pipeline_client.py, run with the Python 3.9 venv that holds
paddle-serving-server 0.9.0, calls it exactly as that example's client does.
The test servers mimic Paddle Serving's name check (err_no 3002) to show the
client surfaces err_no. Skipped when the venv is missing: create it with
scripts/setup_ps_client_venv.sh.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import json_format

from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
PS39_PYTHON = Path(os.environ.get("PS39_PYTHON_BIN", REPO / ".venv-ps39" / "bin" / "python"))
CLIENT = REPO / "tests" / "tools" / "ps_pipeline_client.py"
SERVICE_NAME = "ocr"
# The OCR example's answer: value[0] is the repr of a list of [text, box] items.
BOX = [[10, 20], [110, 20], [110, 44], [10, 44]]

needs_ps39 = pytest.mark.skipif(
    not PS39_PYTHON.exists(), reason=f"{PS39_PYTHON} missing: run scripts/setup_ps_client_venv.sh")
in_module_loop = pytest.mark.asyncio(loop_scope="module")


def answer(request: pb.Request, received: list[pb.Request]) -> pb.Response:
    """What Paddle Serving's OCR pipeline would answer, minus the model.

    The "text" is the decoded image size, so the test sees the bytes arrived intact.
    """
    received.append(request)
    # Paddle Serving's PipelineServicer.inference: an empty name is accepted.
    if request.name not in ("", SERVICE_NAME):
        return pb.Response(err_no=3002, err_msg="Failed to inference: Service name error.")
    image = base64.b64decode(dict(zip(request.key, request.value, strict=False))["image"])
    result = [[f"{len(image)} bytes", BOX]]
    return pb.Response(err_no=0, key=["res"], value=[str(result)])


class _Servicer(pb_grpc.PipelineServiceServicer):
    def __init__(self) -> None:
        self.received: list[pb.Request] = []

    async def inference(self, request: pb.Request, context: grpc.aio.ServicerContext) -> Any:
        return answer(request, self.received)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def grpc_peer() -> AsyncIterator[tuple[str, _Servicer]]:
    server = grpc.aio.server()
    servicer = _Servicer()
    pb_grpc.add_PipelineServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(None)


@pytest.fixture(scope="module")
def http_peer() -> Iterator[tuple[str, list[pb.Request]]]:
    """POST /{name}/{method} with the messages as proto3 JSON, as Paddle Serving's gateway."""
    received: list[pb.Request] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            name, _, method = self.path.strip("/").partition("/")
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            request = json_format.Parse(body, pb.Request())
            request.name, request.method = name, method
            # Default values are omitted, as the gateway's JSON marshaller does.
            reply = json_format.MessageToJson(answer(request, received),
                                              preserving_proto_field_name=True).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ps") / "doc.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


async def run_client(addr: str, image: Path, *extra: str) -> dict[str, Any]:
    """Run the real PipelineClient script; return its one JSON line."""
    proc = await asyncio.create_subprocess_exec(
        str(PS39_PYTHON), str(CLIENT), "--addr", addr, "--image", str(image), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, stderr.decode(errors="replace")[-2000:]
    lines = stdout.decode().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {lines!r}"
    return json.loads(lines[0])


def _expected_value(image: Path) -> list[str]:
    return [str([[f"{image.stat().st_size} bytes", BOX]])]


@needs_ps39
@in_module_loop
async def test_real_pipeline_client_grpc_gets_ocr_answer(grpc_peer, image_file) -> None:
    addr, servicer = grpc_peer
    out = await run_client(addr, image_file, "--name", SERVICE_NAME, "--logid", "7")
    assert out == {"err_no": 0, "err_msg": "", "key": ["res"],
                   "value": _expected_value(image_file)}
    request = servicer.received[-1]
    assert list(request.key) == ["image"]
    assert base64.b64decode(request.value[0]) == image_file.read_bytes()
    assert request.logid == 7
    assert request.name == ""  # the stock client never sets it
    assert request.clientip  # it fills in its own address


@needs_ps39
@in_module_loop
async def test_real_pipeline_client_surfaces_service_name_error(grpc_peer, image_file) -> None:
    addr, servicer = grpc_peer
    out = await run_client(addr, image_file, "--name", "nope", "--rpc-set-name")
    assert out == {"err_no": 3002, "err_msg": "Failed to inference: Service name error.",
                   "key": [], "value": []}
    assert servicer.received[-1].name == "nope"


@needs_ps39
@in_module_loop
async def test_example_http_client_shape(http_peer, image_file) -> None:
    addr, received = http_peer
    out = await run_client(addr, image_file, "--http", "--name", SERVICE_NAME, "--logid", "9")
    assert out == {"err_no": 0, "err_msg": "", "key": ["res"],
                   "value": _expected_value(image_file)}
    assert (received[-1].name, received[-1].method, received[-1].logid) == (
        SERVICE_NAME, "prediction", 9)
    wrong = await run_client(addr, image_file, "--http", "--name", "nope")
    assert wrong["err_no"] == 3002
    assert wrong["err_msg"] == "Failed to inference: Service name error."


@needs_ps39
@in_module_loop
async def test_transport_failure_is_reported(image_file) -> None:
    # A port nobody listens on: the script says so on stdout and exits 2.
    proc = await asyncio.create_subprocess_exec(
        str(PS39_PYTHON), str(CLIENT), "--addr", "127.0.0.1:9", "--image", str(image_file),
        "--timeout", "3", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 2
    assert "error" in json.loads(stdout.decode().splitlines()[-1])


def test_descriptor_matches_design() -> None:
    """Field numbers as DESIGN.md lists them (verified against paddle_serving_server 0.9.0)."""
    fields = {name: {f.name: f.number for f in message.fields}
              for name, message in pb.DESCRIPTOR.message_types_by_name.items()}
    assert pb.DESCRIPTOR.package == "baidu.paddle_serving.pipeline_serving"
    assert fields["Request"] == {"key": 1, "value": 2, "tensors": 3, "name": 4, "method": 5,
                                 "logid": 6, "clientip": 7}
    assert fields["Response"] == {"err_no": 1, "err_msg": 2, "key": 3, "value": 4, "tensors": 5}
    assert fields["Tensor"]["byte_data"] == 10 and fields["Tensor"]["name"] == 23
    method = pb.DESCRIPTOR.services_by_name["PipelineService"].methods_by_name["inference"]
    assert (method.input_type.name, method.output_type.name) == ("Request", "Response")
