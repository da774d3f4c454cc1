"""Drive paddle-meter with KServe's own Python SDK (run with .venv-triton-tools' python).

    kserve_client.py HOST:PORT http://HOST:PORT IMAGE_FILE [MODEL]

(positional: importing kserve parses sys.argv for its model server's own options, and an
option of ours could be taken for an abbreviation of one of them.)

Readiness (server and model) and one OCR inference through ``InferenceRESTClient`` (OIP v2
REST) and ``InferenceGRPCClient`` (OIP v2 gRPC); prints one JSON line with what came back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def _request(model: str, image: bytes, request_id: str) -> InferRequest:
    tensor = InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    return InferRequest(model_name=model, infer_inputs=[tensor], request_id=request_id)


def _texts(response) -> list[str]:
    by_name = {output.name: output for output in response.outputs}
    value = by_name["text"].as_numpy().reshape(-1)[0]
    return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).split("\n")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("grpc")
    parser.add_argument("http")
    parser.add_argument("image", type=Path)
    parser.add_argument("model", nargs="?", default="ocr")
    args = parser.parse_args()
    image = args.image.read_bytes()
    out: dict[str, object] = {}

    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=120))
    try:
        out["rest_server_live"] = await rest.is_server_live(args.http)
        out["rest_server_ready"] = await rest.is_server_ready(args.http)
        out["rest_model_ready"] = await rest.is_model_ready(args.http, args.model)
        response = await rest.infer(
            args.http, _request(args.model, image, "kserve-rest-1"), model_name=args.model
        )
        out["rest_model_name"] = response.model_name
        out["rest_id"] = response.id
        out["rest_texts"] = _texts(response)
    finally:
        await rest.close()

    grpc_client = InferenceGRPCClient(args.grpc, timeout=120)
    try:
        out["grpc_server_live"] = await grpc_client.is_server_live()
        out["grpc_server_ready"] = await grpc_client.is_server_ready()
        out["grpc_model_ready"] = await grpc_client.is_model_ready(args.model)
        response = await grpc_client.infer(_request(args.model, image, "kserve-grpc-1"))
        out["grpc_model_name"] = response.model_name
        out["grpc_id"] = response.id
        out["grpc_texts"] = _texts(response)
    finally:
        await grpc_client.close()
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    asyncio.run(main())
