"""Open Inference Protocol v2 over gRPC (KServe / Triton ``inference.GRPCInferenceService``).

Built on the servicer base class generated inside the ``tritonclient`` package, so the
service name, method names and messages are the ones the real ``tritonclient.grpc`` speaks.
This is the transport only: it reads protobuf messages into the neutral tensors of
serving/oip.py, frames the translator's answers, and turns a ServingError into a gRPC
status. Triton's model-configuration (ModelConfig) and statistics (ModelStatistics)
extensions are served; the other Triton methods (repository, shared memory, trace,
logging, streaming) answer UNIMPLEMENTED with a plain message and log nothing. A version
other than the model's is NOT_FOUND. Any other exception is answered INTERNAL and logged at ERROR with its
traceback and the request id (never grpc's bare ``UNKNOWN``). ServerReady is the server's
readiness (models loaded and the ledger able to accept records), as /v2/health/ready.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from interceptors.model_statistics import PROCESS_STATISTICS, ModelStatistics
from serving import oip
from serving.errors import ServingError, as_serving_error, grpc_code, grpc_trailers, log_internal
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


def caller_request_id(context: grpc.aio.ServicerContext) -> str | None:
    """The x-request-id metadata of a call, for log lines."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "x-request-id" and isinstance(value, str):
            return value
    return None


Handler = Callable[[Any, Any, Any], Awaitable[Any]]


def _answers_errors(method: Handler) -> Handler:
    """A ServingError becomes its gRPC status; anything else INTERNAL, logged with the
    traceback and request id. An abort (grpc.aio.AbortError) passes through as it is."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            error = as_serving_error(exc)
            if error.kind == "internal":
                log_internal(
                    exc, caller_request_id(context), surface="grpc", method=method.__name__
                )
            await context.abort(grpc_code(error.kind), error.message, grpc_trailers(error))

    return wrapper


class OipGrpcService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``ready`` answers ServerReady (default: every model is ready); ``statistics`` is
    what ModelStatistics reports (default: this process's, fed by the metering core)."""

    def __init__(
        self,
        host: ModelHost,
        ready: Callable[[], bool] | None = None,
        statistics: ModelStatistics = PROCESS_STATISTICS,
    ) -> None:
        self._host = host
        self._ready = ready or host.all_ready
        self._statistics = statistics

    async def ServerLive(self, request, context):  # noqa: N802 (OIP method names)
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self._ready())

    @_answers_errors
    async def ModelReady(self, request, context):  # noqa: N802
        ready = oip.model_ready(self._host, request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=ready["ready"])

    @_answers_errors
    async def ServerMetadata(self, request, context):  # noqa: N802
        return json_format.ParseDict(oip.server_metadata(), service_pb2.ServerMetadataResponse())

    @_answers_errors
    async def ModelMetadata(self, request, context):  # noqa: N802
        meta = oip.model_metadata(self._host, request.name, request.version)
        return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse())

    @_answers_errors
    async def ModelConfig(self, request, context):  # noqa: N802
        config = oip.model_config(self._host, request.name, request.version)
        return service_pb2.ModelConfigResponse(
            config=json_format.ParseDict(config, model_config_pb2.ModelConfig())
        )

    @_answers_errors
    async def ModelStatistics(self, request, context):  # noqa: N802
        stats = oip.model_statistics(self._host, request.name, request.version, self._statistics)
        return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse())

    @_answers_errors
    async def ModelInfer(self, request, context):  # noqa: N802
        result = await oip.infer(
            self._host,
            request.model_name,
            _read_inputs(request),
            outputs=[oip.RequestedOutput(o.name) for o in request.outputs],
            binary_default=True,  # gRPC sends every output as raw_output_contents
            request_id=request.id or None,
            version=request.model_version,
        )
        response = service_pb2.ModelInferResponse(
            model_name=result.model_name, model_version=result.model_version, id=request.id
        )
        for output in result.outputs:
            response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
            response.raw_output_contents.append(output.raw)
        return response


def _unimplemented(name: str, streaming: bool) -> Callable[..., Any]:
    """An answer for an OIP/Triton method paddle-meter does not offer: UNIMPLEMENTED with
    a message, where the generated base class would raise NotImplementedError (which grpc
    logs as an unexpected servicer error)."""
    message = f"{SERVICE_NAME}/{name} is not offered by paddle-meter"

    if streaming:

        async def refuse_stream(self: Any, request: Any, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            yield  # pragma: no cover (an async generator, as the stream handler expects)

        return refuse_stream

    async def refuse(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return refuse


for _method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in OipGrpcService.__dict__:
        setattr(
            OipGrpcService,
            _method.name,
            _unimplemented(_method.name, _method.server_streaming),
        )
del _method
