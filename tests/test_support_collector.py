"""The real-collector harness works end to end: OTel SDK -> rotel-agent -> OtlpSink.

Spans and counter sums must survive the real collector over both OTLP gRPC and
OTLP HTTP/protobuf, cumulative and delta counters must fold to the same total,
and a stopped collector must make the SDK's export fail promptly (not hang),
with export working again once the collector is back on the same ports.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from support.collector import OtlpSink, RotelCollector
from support.fixtures import collector, otlp_sink  # noqa: F401 - pytest fixtures


def _exporters(agent: RotelCollector, protocol: str, temporality: AggregationTemporality):
    preferred = {Counter: temporality, Histogram: temporality}
    if protocol == "grpc":
        return (GrpcSpanExporter(endpoint=agent.otlp_grpc_endpoint, insecure=True, timeout=5),
                GrpcMetricExporter(endpoint=agent.otlp_grpc_endpoint, insecure=True, timeout=5,
                                   preferred_temporality=preferred))
    base = agent.otlp_http_endpoint
    return (HttpSpanExporter(endpoint=f"{base}/v1/traces", timeout=5),
            HttpMetricExporter(endpoint=f"{base}/v1/metrics", timeout=5,
                               preferred_temporality=preferred))


@pytest.mark.parametrize(
    ("protocol", "temporality"),
    [("grpc", AggregationTemporality.CUMULATIVE), ("http", AggregationTemporality.DELTA)],
)
def test_spans_and_counter_sum_reach_sink_through_rotel(
    collector: RotelCollector,  # noqa: F811
    otlp_sink: OtlpSink,  # noqa: F811
    protocol: str,
    temporality: AggregationTemporality,
) -> None:
    service = f"harness-{protocol}-{uuid.uuid4().hex[:8]}"
    resource = Resource.create({"service.name": service})
    span_exporter, metric_exporter = _exporters(collector, protocol, temporality)
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    # A long interval: the test decides when points go out, via force_flush.
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=600_000)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    try:
        tracer = tracer_provider.get_tracer("harness-test")
        with tracer.start_as_current_span("linked") as linked:
            linked_ctx = linked.get_span_context()
        with tracer.start_as_current_span(
            "request", kind=SpanKind.SERVER, links=[Link(linked_ctx, {"why": "retry"})],
            attributes={"gen_ai.usage.input_tokens": 12, "paddle_meter.tenant": "acme"},
        ) as parent:
            with tracer.start_as_current_span("ocr.det"):
                pass
            parent.set_status(Status(StatusCode.ERROR, "boom"))
        assert tracer_provider.force_flush(10_000)

        def ours(span: dict[str, Any]) -> bool:
            return span["resource"].get("service.name") == service

        spans = {s["name"]: s for s in otlp_sink.wait_for_spans(ours, timeout=15, count=3)}
        request, child = spans["request"], spans["ocr.det"]
        assert request["kind"] == "SERVER"
        assert request["status_code"] == "ERROR"
        assert request["status_message"] == "boom"
        assert request["attributes"] == {
            "gen_ai.usage.input_tokens": 12, "paddle_meter.tenant": "acme"}
        assert request["parent_span_id"] == ""
        assert child["parent_span_id"] == request["span_id"]
        assert child["trace_id"] == request["trace_id"]
        assert len(request["trace_id"]) == 32 and len(request["span_id"]) == 16
        assert request["links"] == [{"trace_id": spans["linked"]["trace_id"],
                                     "span_id": spans["linked"]["span_id"],
                                     "attributes": {"why": "retry"}}]

        meter = meter_provider.get_meter("harness-test")
        tokens = meter.create_counter(f"harness.tokens.{protocol}", unit="{token}")
        seconds = meter.create_histogram(f"harness.seconds.{protocol}", unit="s")
        tokens.add(3, {"gen_ai.token.type": "input", "service": service})
        tokens.add(5, {"gen_ai.token.type": "output", "service": service})
        seconds.record(0.25, {"service": service})
        assert meter_provider.force_flush(10_000)
        # Second export: cumulative repeats the running total, delta sends only +4.
        tokens.add(4, {"gen_ai.token.type": "input", "service": service})
        seconds.record(0.5, {"service": service})
        assert meter_provider.force_flush(10_000)

        name = f"harness.tokens.{protocol}"
        otlp_sink.wait_for_metric_sum(name, 12, timeout=15, service=service)
        assert otlp_sink.wait_for_metric_sum(
            name, 7, timeout=15, service=service, **{"gen_ai.token.type": "input"}) == 7
        assert otlp_sink.metric_sum(name, service=service, **{"gen_ai.token.type": "output"}) == 5
        assert otlp_sink.metric_sum(name, service=service) == 12
        points = otlp_sink.metric_points(name)
        expected = "cumulative" if temporality == AggregationTemporality.CUMULATIVE else "delta"
        assert {p["temporality"] for p in points} == {expected}
        assert all(p["type"] == "sum" and p["monotonic"] for p in points)
        hist = f"harness.seconds.{protocol}"
        otlp_sink.wait_for_metric_sum(hist, 0.75, timeout=15, service=service)
        assert otlp_sink.metric_count(hist, service=service) == 2
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()


def _export_in_thread(exporter: Any, spans: list) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(exporter.export(spans)), daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stopped_collector_fails_export_fast_then_recovers(
    collector: RotelCollector,  # noqa: F811
    otlp_sink: OtlpSink,  # noqa: F811
    protocol: str,
) -> None:
    service = f"harness-down-{protocol}-{uuid.uuid4().hex[:8]}"
    if protocol == "grpc":
        exporter: Any = GrpcSpanExporter(endpoint=collector.otlp_grpc_endpoint, insecure=True,
                                         timeout=2)
    else:
        exporter = HttpSpanExporter(endpoint=f"{collector.otlp_http_endpoint}/v1/traces",
                                    timeout=2)
    # Capture finished spans in memory so the test can hand them to the exporter itself.
    captured: list = []

    class _Capture(SimpleSpanProcessor):
        def on_end(self, span: Any) -> None:
            captured.append(span)

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(_Capture(exporter))
    tracer = provider.get_tracer("harness-test")
    try:
        collector.stop()
        with tracer.start_as_current_span("while-down"):
            pass
        thread, result = _export_in_thread(exporter, list(captured))
        # A generous bound that only catches a hang; the exporter's own timeout is 2 s.
        thread.join(60)
        assert not thread.is_alive(), "export to a stopped collector hung"
        assert result == [SpanExportResult.FAILURE]
    finally:
        collector.start()
    captured.clear()
    with tracer.start_as_current_span("after-restart"):
        pass
    thread, result = _export_in_thread(exporter, list(captured))
    thread.join(60)
    assert result == [SpanExportResult.SUCCESS]
    arrived = otlp_sink.wait_for_spans(
        lambda s: s["resource"].get("service.name") == service, timeout=15)
    assert [s["name"] for s in arrived] == ["after-restart"]
    provider.shutdown()
