"""Open Inference Protocol v2 over gRPC (KServe / Triton ``inference.GRPCInferenceService``).

Built on the servicer base class generated inside the ``tritonclient`` package, so the
service name, method names and messages are the ones the real ``tritonclient.grpc`` speaks.
This is the transport only: it reads protobuf messages into the neutral tensors of
serving/oip.py, frames the translator's answers, and turns a ServingError into a gRPC
status. Methods beyond the OIP core (repository, shared memory, trace...) answer
UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serving import oip
from serving.errors import ServingError, grpc_code
from serving.model_host import ModelHost
from serving.oip_tensors import CONTENTS_FIELD

__all__ = ["OipGrpcService", "SERVICE_NAME"]

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _read_inputs(request: service_pb2.ModelInferRequest) -> Iterator[oip.Tensor]:
    """The request's inputs, raw or typed contents; a generator, so it checks when iterated."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ServingError(
            "invalid_argument",
            f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one per input",
        )
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            yield oip.Tensor(tensor.name, tensor.datatype, shape, raw=raw[index])
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            raise ServingError(
                "invalid_argument",
                f"input {tensor.name!r}: datatype {tensor.datatype!r} needs raw_input_contents",
            )
        values = list(getattr(tensor.contents, field))
        yield oip.Tensor(tensor.name, tensor.datatype, shape, data=values)


class OipGrpcService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, host: ModelHost) -> None:
        self._host = host

    async def _fail(self, context: grpc.aio.ServicerContext, error: ServingError) -> None:
        await context.abort(grpc_code(error.kind), error.message)

    async def ServerLive(self, request, context):  # noqa: N802 (OIP method names)
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self._host.all_ready())

    async def ModelReady(self, request, context):  # noqa: N802
        try:
            ready = oip.model_ready(self._host, request.name)
        except ServingError as exc:
            await self._fail(context, exc)
        return service_pb2.ModelReadyResponse(ready=ready["ready"])

    async def ServerMetadata(self, request, context):  # noqa: N802
        return json_format.ParseDict(oip.server_metadata(), service_pb2.ServerMetadataResponse())

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            meta = oip.model_metadata(self._host, request.name)
        except ServingError as exc:
            await self._fail(context, exc)
        return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse())

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            result = await oip.infer(
                self._host,
                request.model_name,
                _read_inputs(request),
                outputs=[oip.RequestedOutput(o.name) for o in request.outputs],
                binary_default=True,  # gRPC sends every output as raw_output_contents
                request_id=request.id or None,
            )
        except ServingError as exc:
            await self._fail(context, exc)
        response = service_pb2.ModelInferResponse(
            model_name=result.model_name, model_version=result.model_version, id=request.id
        )
        for output in result.outputs:
            response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
            response.raw_output_contents.append(output.raw)
        return response
