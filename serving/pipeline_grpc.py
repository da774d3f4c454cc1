"""The Paddle Serving 0.9 pipeline protocol over gRPC (``PipelineService.inference``).

Transport only: the request message goes to serving/pipeline.py and its reply is framed as
the Response message, always with gRPC OK (failures travel in ``err_no`` / ``err_msg``).
"""

from __future__ import annotations

from serving.model_host import ModelHost
from serving.pipeline import answer_pipeline
from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc

__all__ = ["PipelineGrpcService", "SERVICE_NAME"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PipelineService"].full_name


class PipelineGrpcService(pb_grpc.PipelineServiceServicer):
    def __init__(self, host: ModelHost) -> None:
        self._host = host

    async def inference(self, request: pb.Request, context) -> pb.Response:
        reply = await answer_pipeline(
            self._host,
            request.name,
            request.method,
            request.key,
            request.value,
            request.tensors,
            request.logid,
        )
        return pb.Response(
            err_no=reply.err_no, err_msg=reply.err_msg, key=reply.keys, value=reply.values
        )
