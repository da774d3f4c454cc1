"""Open Inference Protocol v2 over gRPC (KServe / Triton ``inference.GRPCInferenceService``).

Built on the servicer base class generated inside the ``tritonclient`` package, so the
service name, method names and messages are the ones the real ``tritonclient.grpc`` speaks.
Methods beyond the OIP core (repository, shared memory, trace...) answer UNIMPLEMENTED.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serving.dispatch import run_model
from serving.errors import ServingError, as_serving_error, grpc_code
from serving.model_host import ModelHost
from serving.oip_tensors import (
    CONTENTS_FIELD,
    bytes_tensor,
    decode_raw,
    encode_raw,
    from_json_data,
)

__all__ = ["OipGrpcService", "SERVICE_NAME"]

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

try:
    _VERSION = version("paddle-meter")
except PackageNotFoundError:  # running from a source tree that is not installed
    _VERSION = "0"


def _decode_inputs(request: service_pb2.ModelInferRequest) -> dict[str, Any]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ServingError(
            "invalid_argument",
            f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one per input",
        )
    decoded: dict[str, Any] = {}
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            decoded[tensor.name] = decode_raw(tensor.name, tensor.datatype, shape, raw[index])
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            raise ServingError(
                "invalid_argument",
                f"input {tensor.name!r}: datatype {tensor.datatype!r} needs raw_input_contents",
            )
        values = list(getattr(tensor.contents, field))
        if tensor.datatype == "BYTES":
            decoded[tensor.name] = bytes_tensor(tensor.name, values, shape)
        else:
            decoded[tensor.name] = from_json_data(tensor.name, tensor.datatype, shape, values)
    return decoded


class OipGrpcService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, host: ModelHost) -> None:
        self._host = host

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        error = as_serving_error(exc)
        await context.abort(grpc_code(error.kind), error.message)

    async def ServerLive(self, request, context):  # noqa: N802 (OIP method names)
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self._host.all_ready())

    async def ModelReady(self, request, context):  # noqa: N802
        try:
            model = self._host.get(request.name)
        except ServingError as exc:
            await self._fail(context, exc)
        return service_pb2.ModelReadyResponse(ready=model.adapter.is_ready())

    async def ServerMetadata(self, request, context):  # noqa: N802
        return service_pb2.ServerMetadataResponse(
            name="paddle-meter", version=_VERSION, extensions=["binary_tensor_data"]
        )

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            model = self._host.get(request.name)
        except ServingError as exc:
            await self._fail(context, exc)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform="paddle_inference",
            inputs=[tensor(**t) for t in model.codec.oip_inputs()],
            outputs=[tensor(**t) for t in model.codec.oip_outputs()],
        )

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            served, results = await run_model(
                self._host,
                request.model_name,
                lambda codec: codec.from_oip(_decode_inputs(request)),
                request_id=request.id or None,
            )
            outputs = served.codec.to_oip(results)
        except Exception as exc:
            await self._fail(context, exc)
        wanted = {o.name for o in request.outputs}
        response = service_pb2.ModelInferResponse(
            model_name=served.name, model_version=served.version, id=request.id
        )
        for output in outputs:
            if wanted and output.name not in wanted:
                continue
            response.outputs.add(
                name=output.name, datatype=output.datatype, shape=output.array.shape
            )
            response.raw_output_contents.append(encode_raw(output.datatype, output.array))
        return response
