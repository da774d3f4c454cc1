"""The per-request inference limit (server.request_timeout_s) on every surface.

A server whose limit is far below one OCR inference answers DEADLINE_EXCEEDED / 504 /
err_no 6000 with a message naming the setting, records the failed call unbilled, and keeps
serving (health answers; the abandoned inference finishes in the background).
"""

from __future__ import annotations

import base64

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from imaging import CORPUS
from support.server import ServerProcess
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
