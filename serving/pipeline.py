"""The Paddle Serving 0.9 pipeline protocol over gRPC, and the logic its HTTP form shares.

Request.name picks the model (empty: the first configured one, as a one-service Paddle
Serving server accepts an empty name); key/value pairs (or tensors with ``str_data`` /
``byte_data``) carry the inputs. Failures are answered the Paddle Serving way, with gRPC OK
and ``err_no`` / ``err_msg`` set, so its clients' error checks work unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence

from models.usage import current_usage
from serving.dispatch import run_model, tokenize
from serving.errors import ServingError, as_serving_error, pipeline_err_no
from serving.model_host import ModelHost
from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc

__all__ = [
    "PipelineGrpcService",
    "PipelineReply",
    "SERVICE_NAME",
    "handle_pipeline",
    "pipeline_failure",
    "pipeline_fields",
]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PipelineService"].full_name
log = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineReply:
    err_no: int = 0
    err_msg: str = ""
    keys: list[str] = dataclasses.field(default_factory=list)
    values: list[str] = dataclasses.field(default_factory=list)


def pipeline_fields(
    keys: Sequence[str], values: Sequence[str], tensors: Sequence[pb.Tensor] = ()
) -> dict[str, str]:
    """Pair keys with values (and tensors by name); raises ServingError on a mismatch."""
    if len(keys) != len(values):
        raise ServingError(
            "invalid_argument", f"{len(keys)} keys but {len(values)} values; send one value per key"
        )
    fields: dict[str, str] = {}
    for key, value in zip(keys, values, strict=True):
        if not isinstance(key, str) or not isinstance(value, str):
            raise ServingError("invalid_argument", f"key {key!r}: keys and values must be strings")
        if key in fields:
            raise ServingError("invalid_argument", f"key {key!r} is sent twice")
        fields[key] = value
    for tensor in tensors:
        if tensor.str_data:
            fields[tensor.name] = tensor.str_data[0]
        elif tensor.byte_data:
            fields[tensor.name] = tensor.byte_data.decode("ascii", errors="replace")
    return fields


async def handle_pipeline(
    host: ModelHost, name: str, fields: Mapping[str, str], logid: int, method: str = ""
) -> PipelineReply:
    """Run one pipeline request; never raises for a bad request, it answers err_no instead.

    ``method`` ``tokenize`` counts tokens without inference (ERNIE models); any other
    method segment runs the model, as Paddle Serving's gateway accepts any."""
    model_name = name or host.default_name() or ""
    try:
        if name and name not in host.names():
            served = ", ".join(host.names()) or "none"
            raise ServingError(
                "not_found",
                f"Failed to inference: Service name error. Unknown service {name!r}; "
                f"this server serves: {served}",
            )
        if method == "tokenize":
            counted = await tokenize(host, model_name, fields.get("text"), fields.get("text_pair"))
            keys = ["input_ids", "token_type_ids", "count", "truncated"]
            values = [json.dumps(counted[k]) for k in keys]
            return PipelineReply(0, "", keys, values)
        served_model, results = await run_model(
            host,
            model_name,
            lambda codec: codec.from_pipeline(fields),
            request_id=str(logid) if logid else None,
        )
        out = served_model.codec.to_pipeline(results)
        return PipelineReply(0, "", list(out), list(out.values()))
    except Exception as exc:
        error = as_serving_error(exc)
        if error.kind == "internal":
            log.exception("pipeline request failed", extra={"model": model_name})
        return pipeline_failure(error, model_name)


def pipeline_failure(error: ServingError, model: str | None = None) -> PipelineReply:
    """The err_no reply for ``error``, marking the metered call failed (transport says OK)
    and recording it against ``model`` so the failed call is in the ledger, unbilled."""
    err_no = pipeline_err_no(error.kind)
    if (usage := current_usage()) is not None:
        usage.app_status = f"err_no={err_no}"
        if usage.model is None and model:
            usage.model = model
    return PipelineReply(err_no, error.message)


class PipelineGrpcService(pb_grpc.PipelineServiceServicer):
    def __init__(self, host: ModelHost) -> None:
        self._host = host

    async def inference(self, request: pb.Request, context) -> pb.Response:
        try:
            fields = pipeline_fields(request.key, request.value, request.tensors)
        except ServingError as exc:
            reply = pipeline_failure(exc, request.name or self._host.default_name())
            return pb.Response(err_no=reply.err_no, err_msg=reply.err_msg)
        reply = await handle_pipeline(
            self._host, request.name, fields, request.logid, request.method
        )
        return pb.Response(
            err_no=reply.err_no, err_msg=reply.err_msg, key=reply.keys, value=reply.values
        )
