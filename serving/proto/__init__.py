"""Generated protobuf/gRPC code for the Paddle Serving 0.9 pipeline protocol.

`pipeline_service.proto` is wire-compatible with Paddle Serving's own
`baidu.paddle_serving.pipeline_serving.PipelineService` (field names and numbers
checked against the descriptors in paddle_serving_server 0.9.0). The `_pb2`
modules are generated; regenerate them from the repository root with:

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. \
        --grpc_python_out=. serving/proto/pipeline_service.proto

(grpcio-tools 1.78.x, protoc 31.1: its gencode needs protobuf >= 6.31.1 and
grpcio >= 1.78.2 at run time.)
"""

from serving.proto import pipeline_service_pb2, pipeline_service_pb2_grpc

__all__ = ["pipeline_service_pb2", "pipeline_service_pb2_grpc"]
