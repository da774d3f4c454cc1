"""SpanWireEncoder writes the same ExportTraceServiceRequest as the SDK's encode_spans.

Real SDK spans (in-memory exporter) of every shape our server produces and some it does
not: scalar and array attributes, error status with a message, remote and local parents,
trace state, events, links, two resources and two scopes in one batch.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from exporters.otlp_wire import SpanWireEncoder


def _spans() -> list:
    memory = InMemorySpanExporter()
    providers = []
    for service in ("paddle-meter", "other"):
        provider = TracerProvider(
            resource=Resource.create({"service.name": service, "host.name": "h"})
        )
        provider.add_span_processor(SimpleSpanProcessor(memory))
        providers.append(provider)
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )
    tracer = providers[0].get_tracer("paddle_meter", "0.1.0")
    with tracer.start_as_current_span(
        "inference.GRPCInferenceService/ModelInfer",
        context=trace.set_span_in_context(trace.NonRecordingSpan(remote)),
        kind=SpanKind.SERVER,
        attributes={
            "gen_ai.usage.output_tokens": 83,
            "paddle_meter.tenant": "财务部",
            "paddle_meter.cost": "0.002660",
            "ok": True,
            "ratio": 0.5,
            "big": -(2**40),
        },
    ) as server:
        with tracer.start_as_current_span("ocr.det", attributes={"ocr.boxes": 4}):
            pass
        server.set_status(Status(StatusCode.ERROR, "image bytes could not be decoded"))
    with tracer.start_as_current_span("with-events", attributes={"list": [1, 2, 3]}) as span:
        span.add_event("retry", {"attempt": 2})
    other = providers[1].get_tracer("scope-b")
    with other.start_as_current_span("linked", links=[Link(remote, {"why": "batch"})]):
        pass
    with other.start_as_current_span("plain", kind=SpanKind.CLIENT):
        pass
    return list(memory.get_finished_spans())


def test_wire_bytes_parse_to_the_sdk_message():
    spans = _spans()
    encoder = SpanWireEncoder()
    for _ in range(2):  # the second pass runs from the caches
        ours = ExportTraceServiceRequest.FromString(encoder.encode(spans))
        sdk = encode_spans(spans)
        assert ours == sdk
        assert ours.SerializeToString(deterministic=True) == sdk.SerializeToString(
            deterministic=True
        )
