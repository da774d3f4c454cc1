"""The Paddle Serving 0.9 pipeline protocol over gRPC (``PipelineService.inference``).

Transport only: the request message goes to serving/pipeline.py and its reply is framed as
the Response message, always with gRPC OK (failures travel in ``err_no`` / ``err_msg``).
It sets ``usage.error_renderer`` so a call metering refuses after it ran is answered with
a Response message too, not a gRPC status this protocol's clients do not check.
"""

from __future__ import annotations

import grpc

from models.usage import current_usage
from serving.model_host import ModelHost
from serving.oip_grpc import caller_request_id
from serving.pipeline import PipelineReply, answer_pipeline, error_reply
from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc

__all__ = ["PipelineGrpcService", "SERVICE_NAME"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PipelineService"].full_name


def _response(reply: PipelineReply) -> pb.Response:
    return pb.Response(
        err_no=reply.err_no, err_msg=reply.err_msg, key=reply.keys, value=reply.values
    )


def _render_error(kind: str, message: str) -> pb.Response:
    """``usage.error_renderer`` of the pipeline over gRPC: a Response, sent with status OK."""
    return _response(error_reply(kind, message))


class PipelineGrpcService(pb_grpc.PipelineServiceServicer):
    def __init__(self, host: ModelHost) -> None:
        self._host = host

    async def inference(
        self, request: pb.Request, context: grpc.aio.ServicerContext
    ) -> pb.Response:
        if (usage := current_usage()) is not None:
            usage.error_renderer = _render_error
        reply = await answer_pipeline(
            self._host,
            request.name,
            request.method,
            request.key,
            request.value,
            request.tensors,
            request.logid,
            caller_request_id=caller_request_id(context),
        )
        return _response(reply)
