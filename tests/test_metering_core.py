"""Metering core and telemetry setup: config parsing, records, policies, Prometheus output.

Also holds the helpers the transport tests import (``InMemoryUsageSink``,
``make_telemetry``): a real SDK with in-memory exporter/reader, never global providers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from exporters import semconv as sc
from exporters.ledger.base import LedgerWriteError, UsageSink, WriteOutcome
from exporters.otel import Telemetry, TelemetryConfig, setup_telemetry
from exporters.usage_record import UsageRecord
from interceptors.core import MeteringCore, default_tenant_resolver
from models.usage import current_usage, report_usage, stage


class InMemoryUsageSink:
    """Test double of a ledger (an in-memory list, not durable): records every submit.

    ``fail=True`` makes every submit raise LedgerWriteError, like a database that is down.
    """

    def __init__(self, fail: bool = False) -> None:
        self.records: list[UsageRecord] = []
        self.fail = fail

    async def submit(self, record: UsageRecord) -> WriteOutcome:
        if self.fail:
            raise LedgerWriteError("test sink told to fail")
        self.records.append(record)
        return WriteOutcome(True)

    def write_batch(self, records: Sequence[UsageRecord]) -> list[WriteOutcome]:
        self.records.extend(records)
        return [WriteOutcome(True) for _ in records]

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def shutdown(self) -> None:
        pass


class TestPriceBook:
    """Test price table: 1/1000 of a unit per billable token."""

    __test__ = False

    def price(self, record: UsageRecord) -> tuple[str, str]:
        return "test-v1", f"{record.billable_tokens / 1000:.6f}"


def make_telemetry(
    cfg: dict | None = None,
) -> tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]:
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(
        TelemetryConfig.from_mapping(cfg or {"exporter": "none"}, env={}),
        span_processors=[SimpleSpanProcessor(spans)],
        metric_readers=[reader],
    )
    return telemetry, spans, reader


def metric_points(reader: InMemoryMetricReader, name: str) -> list:
    data = reader.get_metrics_data()
    points = []
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    points.extend(metric.data.data_points)
    return points


def metric_sum(reader: InMemoryMetricReader, name: str, **attrs: object) -> float:
    return sum(
        (p.sum if hasattr(p, "explicit_bounds") else p.value)  # histograms: sum
        for p in metric_points(reader, name)
        if all(p.attributes.get(k) == v for k, v in attrs.items())
    )


@pytest.fixture
def telemetry():
    tel, spans, reader = make_telemetry()
    yield tel, spans, reader
    tel.shutdown()


def test_in_memory_sink_is_a_usage_sink() -> None:
    assert isinstance(InMemoryUsageSink(), UsageSink)


def test_config_env_wins_and_endpoint_turns_otlp_on() -> None:
    cfg = TelemetryConfig.from_mapping(
        {"exporter": "none", "service_name": "x", "otlp_endpoint": None},
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret,x-b=2",
            "OTEL_SERVICE_NAME": "meter-a",
            "OTEL_METRIC_EXPORT_INTERVAL": "5000",
        },
    )
    assert cfg.exporter == "otlp"
    assert cfg.signal_endpoint("traces") == "http://collector:4318/v1/traces"
    assert cfg.signal_endpoint("metrics") == "http://collector:4318/v1/metrics"
    assert cfg.headers == {"api-key": "s=cret", "x-b": "2"}
    assert cfg.service_name == "meter-a"
    assert cfg.export_interval_ms == 5000
    disabled = TelemetryConfig.from_mapping(
        {"exporter": "otlp"}, env={"OTEL_SDK_DISABLED": "true"}
    )
    assert disabled.exporter == "none"
    grpc_cfg = TelemetryConfig.from_mapping({"exporter": "otlp"}, env={})
    assert grpc_cfg.signal_endpoint("traces") == "http://localhost:4317"


def test_config_rejects_unknown_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown telemetry option"):
        TelemetryConfig.from_mapping({"exporterr": "otlp"}, env={})
    with pytest.raises(ValueError, match="exporter must be one of"):
        TelemetryConfig.from_mapping({"exporter": "jaeger"}, env={})
    with pytest.raises(ValueError, match="protocol must be one of"):
        TelemetryConfig.from_mapping({"otlp_protocol": "http/json"}, env={})
    with pytest.raises(ValueError, match="unknown metering option"):
        MeteringCore.from_config({"enable": False}, None)


def test_resource_and_shutdown_idempotent(telemetry) -> None:
    tel, _, _ = telemetry
    attrs = tel.tracer_provider.resource.attributes
    assert attrs["service.name"] == "paddle-meter"
    assert attrs["service.instance.id"] and attrs["host.name"] and attrs["process.pid"]
    tel.shutdown()
    tel.shutdown()


def test_tenant_resolver() -> None:
    assert default_tenant_resolver({}) == "default"
    assert default_tenant_resolver({"x-tenant": "acme"}) == "acme"
    assert default_tenant_resolver({"x-tenant": "bad tenant\n"}) == "default"


async def _model_call(core: MeteringCore, carrier: dict, text: str, *, fail: bool = False):
    call = core.start_call(protocol="grpc", endpoint="/t.S/M", span_name="t.S/M",
                           carrier=carrier, attributes={sc.RPC_SYSTEM: "grpc"})
    with call.activate():
        usage = current_usage()
        usage.model, usage.operation = "ocr", "ocr"

        def infer() -> None:
            with stage("ocr.rec"):
                report_usage(output_tokens=len(text), characters=len(text), images=1)

        await asyncio.to_thread(infer)
    record = await call.finish(ok=not fail, status="INTERNAL" if fail else "OK",
                               request_bytes=10, response_bytes=20)
    return call, record


async def test_record_ids_pricing_and_metrics(telemetry) -> None:
    tel, spans, reader = telemetry
    sink = InMemoryUsageSink()
    core = MeteringCore(tel, ledger=sink, pricebook=TestPriceBook(), tenant_cap=1)
    try:
        call, rec = await _model_call(core, {"x-request-id": "r-1", "x-tenant": "a"}, "hello")
        assert rec is sink.records[0]
        assert (rec.request_id, rec.tenant, rec.output_tokens, rec.billable_tokens) == (
            "r-1", "a", 5, 5)
        assert (rec.price_id, rec.cost, rec.status, rec.images) == ("test-v1", "0.005000", "ok", 1)
        assert dict(call.response_metadata())["x-usage-output-tokens"] == "5"
        _, rec2 = await _model_call(core, {"x-tenant": "b"}, "abc", fail=True)
        assert len(rec2.request_id) == 32 and rec2.billable_tokens == 0
        assert rec2.status == "INTERNAL" and rec2.cost == "0.000000"
        server = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
        assert server[1].status.status_code == StatusCode.ERROR
        stages = [s for s in spans.get_finished_spans() if s.name == "ocr.rec"]
        assert [s.parent.span_id for s in stages] == [
            s.context.span_id for s in server]
        assert metric_sum(reader, sc.METRIC_TOKENS) == 5
        assert metric_sum(reader, sc.METRIC_REQUESTS, status="ok") == 1
        # tenant cap 1: the second tenant's label is the overflow bucket, its record is not.
        assert metric_sum(reader, sc.METRIC_REQUESTS, **{sc.PADDLE_METER_TENANT: "_other"}) == 1
        assert rec2.tenant == "b"
        body, content_type = tel.render_metrics()
        assert content_type.startswith("text/plain")
        assert b'paddle_meter_tokens_total{' in body and b"gen_ai_token_type=\"output\"" in body
    finally:
        core.close()


async def test_frontend_request_id_and_app_status(telemetry) -> None:
    tel, spans, _ = telemetry
    sink = InMemoryUsageSink()
    core = MeteringCore(tel, ledger=sink)
    try:
        call = core.start_call(protocol="http", endpoint="/ocr/prediction",
                               span_name="POST /ocr/prediction", carrier={}, attributes={})
        with call.activate():
            u = current_usage()
            u.model, u.operation, u.request_id = "ocr", "ocr", "7"
            u.app_status, u.content, u.content_sha256 = "err_no=3002", "secret", "ab" * 32
            u.add(output_tokens=3)
        rec = await call.finish(ok=True, status="200")
        assert (rec.request_id, rec.status, rec.billable_tokens) == ("7", "err_no=3002", 0)
        assert rec.content is None and rec.content_sha256 == "ab" * 32
        assert spans.get_finished_spans()[-1].status.status_code == StatusCode.ERROR
        # A health call gets a span but never a ledger record.
        call = core.start_call(protocol="grpc", endpoint="/grpc.health.v1.Health/Check",
                               span_name="h", carrier={}, attributes={}, operation="health")
        assert await call.finish(ok=True, status="OK") is None
        assert len(sink.records) == 1
    finally:
        core.close()


async def test_ledger_failure_raises(telemetry) -> None:
    tel, spans, reader = telemetry
    core = MeteringCore(tel, ledger=InMemoryUsageSink(fail=True))
    try:
        with pytest.raises(LedgerWriteError):
            await _model_call(core, {}, "abc")
        span = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER][0]
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes[sc.PADDLE_METER_BILLABLE_TOKENS] == 0
        assert metric_sum(reader, sc.METRIC_REQUESTS, status="UNAVAILABLE") == 1
        assert metric_sum(reader, sc.METRIC_METER_ERRORS) == 1
    finally:
        core.close()


def test_disabled_core_needs_no_telemetry() -> None:
    core = MeteringCore.from_config({"enabled": False}, None)
    assert not core.enabled
    with pytest.raises(ValueError, match="needs a Telemetry"):
        MeteringCore(None)


async def test_prometheus_series_once_after_flushes(telemetry) -> None:
    tel, _, _ = telemetry
    core = MeteringCore(tel)
    try:
        await _model_call(core, {"x-tenant": "p"}, "abcd")
        tel.force_flush()
        tel.meter_provider.force_flush()
        body = tel.render_metrics()[0].decode()
        lines = [ln for ln in body.splitlines() if ln.startswith("paddle_meter_tokens_total{")]
        assert len(lines) == 1 and lines[0].endswith(" 4.0")
    finally:
        core.close()
