"""Metering core and telemetry setup: config parsing, records, policies, Prometheus output.

Also holds the helpers the transport tests import (``InMemoryUsageSink``,
``IdempotentUsageSink``, ``make_telemetry``): a real SDK with in-memory exporter/reader,
never global providers. The sinks are test doubles of a ledger (not durable); the real
ledgers' own idempotency is tested in tests/test_ledger_*.py and end to end in
tests/test_idempotency.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from exporters import semconv as sc
from exporters.ledger.base import (
    BilledRecord,
    LedgerHealth,
    LedgerWriteError,
    ReportsHealth,
    UsageSink,
    WriteOutcome,
)
from exporters.otel import Telemetry, TelemetryConfig, setup_telemetry
from exporters.usage_record import UsageRecord
from interceptors import LEDGER_FAILURE_MESSAGE, START_FAILURE_MESSAGE
from interceptors.billing_policy import LEDGER_CANNOT_ACCEPT_MESSAGE
from interceptors.core import MeteringCore, default_tenant_resolver
from models.usage import current_usage, report_usage, stage
from serving.errors import ServingError


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


class IdempotentUsageSink(InMemoryUsageSink):
    """Test double of a ledger with the contract's idempotency (exporters/ledger/base.py):
    one ok record per (tenant, request_id); a not-inserted ok record gets ``existing`` (the
    billed figures) and, with the same content_sha256, ``replays`` counted up. Also a
    ReportsHealth (``accepting``, ``health``) with a commit listener, like the SQL writers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.billed: dict[tuple[str, str], UsageRecord] = {}
        self.replays: dict[tuple[str, str], int] = {}
        self.accepting = True
        self.spool_pending = 0
        self.write_failures = 0
        self.listeners: list[Callable[[float, int], None]] = []

    async def submit(self, record: UsageRecord) -> WriteOutcome:
        key = (record.tenant, record.request_id)
        first = self.billed.get(key) if record.status == "ok" else None
        if first is None:
            if record.status == "ok":
                self.billed[key] = record
            self.records.append(record)
            for listener in self.listeners:
                listener(0.002, 1)
            return WriteOutcome(True)
        existing = BilledRecord(first.content_sha256, first.input_tokens, first.output_tokens,
                                first.billable_tokens, first.price_id, first.cost)
        if first.content_sha256 != record.content_sha256:
            return WriteOutcome(False, existing=existing)
        self.replays[key] = self.replays.get(key, 0) + 1
        return WriteOutcome(False, existing=existing, replays=self.replays[key])

    def health(self) -> LedgerHealth:
        return LedgerHealth(
            healthy=self.accepting, database_ok=self.accepting, spool_ok=False,
            spool_pending=self.spool_pending, write_failures=self.write_failures, db_errors=0,
            quarantined=0, torn_lines=0, last_commit_latency_s=None, spool_dir=None)

    def can_accept(self) -> bool:
        return self.accepting

    def add_commit_listener(self, listener: Callable[[float, int], None]) -> None:
        self.listeners.append(listener)


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
    assert not isinstance(InMemoryUsageSink(), ReportsHealth)
    assert isinstance(IdempotentUsageSink(), UsageSink)
    assert isinstance(IdempotentUsageSink(), ReportsHealth)


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
    assert default_tenant_resolver({"x-tenant": " acme.eu "}) == "acme.eu"
    for bad in ("bad tenant", "ac\nme", "", "  ", "t" * 65, "a/b"):
        with pytest.raises(ServingError) as refused:
            default_tenant_resolver({"x-tenant": bad})
        assert refused.value.kind == "invalid_argument"
        assert "x-tenant must be" in refused.value.message


def _start(core: MeteringCore, carrier: dict, operation: str | None = None):
    return core.start_call(protocol="grpc", endpoint="/t.S/M", span_name="t.S/M",
                           carrier=carrier, attributes={}, operation=operation)


@pytest.mark.parametrize("bad_id", ["has space", "trailing-newline\n", "", "x" * 129,
                                    "semi;colon", "caf\u00e9"])
async def test_malformed_request_id_is_refused_not_replaced(telemetry, bad_id) -> None:
    tel, spans, _ = telemetry
    core = MeteringCore(tel, ledger=InMemoryUsageSink())
    try:
        with pytest.raises(ServingError) as refused:
            _start(core, {"x-request-id": bad_id})
        assert refused.value.kind == "invalid_argument"
        assert "x-request-id must be 1 to 128 characters" in refused.value.message
        assert bad_id not in refused.value.message or not bad_id  # never echoed
        assert spans.get_finished_spans() == ()
        ok = _start(core, {"x-request-id": "A-z.0_9:" + "x" * 120})  # 128 characters
        assert ok.request_id == "A-z.0_9:" + "x" * 120
        await ok.finish(ok=True, status="OK")
    finally:
        core.close()


async def test_oversized_or_malformed_trace_headers_start_a_new_trace(telemetry) -> None:
    tel, spans, _ = telemetry
    core = MeteringCore(tel)
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        for carrier in (
            {"traceparent": good},
            {"traceparent": good + "-" + "a" * 520},  # too long: ignored, even if parseable
            {"traceparent": "00-zz-yy-01"},
            {"traceparent": good, "baggage": "k=" + "v" * 600},
        ):
            await _start(core, carrier).finish(ok=True, status="OK")
        first, long_tp, bad_tp, long_baggage = spans.get_finished_spans()
        assert format(first.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
        assert long_tp.parent is None and bad_tp.parent is None
        assert long_tp.context.trace_id != first.context.trace_id
        assert long_baggage.parent.span_id == 0xB7AD6B7169203331  # only the baggage dropped
    finally:
        core.close()


async def test_ledger_that_cannot_accept_refuses_model_calls_at_start(telemetry) -> None:
    tel, spans, _ = telemetry
    sink = IdempotentUsageSink()
    core = MeteringCore(tel, ledger=sink)
    try:
        sink.accepting = False
        with pytest.raises(ServingError) as refused:
            _start(core, {})
        assert (refused.value.kind, refused.value.message) == (
            "unavailable", LEDGER_CANNOT_ACCEPT_MESSAGE)
        health = _start(core, {}, operation="health")  # never billed: still answered
        assert await health.finish(ok=True, status="OK") is None
        sink.accepting = True
        await _model_call(core, {}, "abc")
        assert len(sink.records) == 1 and len(spans.get_finished_spans()) == 3
    finally:
        core.close()


async def test_start_refusal_fails_closed_and_logs_no_header_values(telemetry, caplog) -> None:
    tel, _, reader = telemetry
    secret = "tenant-secret-value"

    def broken_resolver(carrier):
        raise RuntimeError(f"auth backend down for {carrier['x-tenant']}")

    core = MeteringCore(tel, tenant_resolver=broken_resolver)
    try:
        with pytest.raises(RuntimeError) as raised:
            _start(core, {"x-tenant": secret})
        with caplog.at_level(logging.ERROR, logger="interceptors.core"):
            refusal = core.start_refusal(raised.value)
        assert (refusal.kind, refusal.message) == ("unavailable", START_FAILURE_MESSAGE)
        (entry,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert "broken_resolver" in entry.stack and "RuntimeError" in entry.getMessage()
        assert secret not in entry.getMessage() + entry.stack and not entry.exc_info
        assert metric_sum(reader, sc.METRIC_METER_ERRORS, where="start") == 1
        own = ServingError("invalid_argument", "x")
        assert core.start_refusal(own) is own  # a refusal is answered as it is
    finally:
        core.close()


async def _payload_call(core: MeteringCore, carrier: dict, sha: str, tokens: int,
                        protocol: str = "grpc"):
    """A successful model call with payload hash ``sha`` reporting ``tokens`` output tokens;
    returns (call, record or None, refusal or None)."""
    call = core.start_call(protocol=protocol, endpoint="/t", span_name="t", carrier=carrier,
                           attributes={})
    with call.activate():
        usage = current_usage()
        usage.model, usage.operation, usage.content_sha256 = "ocr", "ocr", sha
        usage.add(input_tokens=1, output_tokens=tokens)
    try:
        return call, await call.finish(ok=True, status="OK" if protocol == "grpc" else "200"), None
    except ServingError as refusal:
        return call, None, refusal


async def test_replays_report_the_original_usage_and_count_once(telemetry) -> None:
    tel, spans, reader = telemetry
    sink = IdempotentUsageSink()
    core = MeteringCore(tel, ledger=sink, pricebook=TestPriceBook(), max_replays=2)
    carrier = {"x-request-id": "same-1", "x-tenant": "acme"}
    try:
        first, record, _ = await _payload_call(core, carrier, "aa" * 32, 5)
        assert record is not None and record.billable_tokens == 6
        assert sc.HEADER_USAGE_REPLAY not in dict(first.response_metadata())
        # The retry's model happens to count differently: the caller is told what was billed.
        again, record, refusal = await _payload_call(core, carrier, "aa" * 32, 9)
        assert record is None and refusal is None and again.ok
        assert again.replay is not None and again.replay.billable_tokens == 6
        assert dict(again.response_metadata()) == {
            "x-request-id": "same-1", "x-usage-input-tokens": "1",
            "x-usage-output-tokens": "5", "x-usage-replay": "true"}
        span = spans.get_finished_spans()[-1]
        assert span.attributes[sc.PADDLE_METER_USAGE_REPLAY] is True
        assert span.attributes[sc.PADDLE_METER_BILLABLE_TOKENS] == 6
        assert span.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 5
        assert span.attributes[sc.PADDLE_METER_COST] == "0.006000"
        assert sc.PADDLE_METER_USAGE_REPLAY not in spans.get_finished_spans()[0].attributes
        # Same id, other payload: refused, named; nothing written, nothing counted.
        _, record, refusal = await _payload_call(core, carrier, "bb" * 32, 5)
        assert record is None and refusal.kind == "already_exists"
        assert refusal.message == (
            "x-request-id 'same-1' was already used by tenant 'acme' for a different payload;"
            " send a new x-request-id")
        # Another tenant may use the same id: its own key, billed.
        _, record, _ = await _payload_call(core, {**carrier, "x-tenant": "other"}, "bb" * 32, 2)
        assert record is not None and record.tenant == "other"
        # Replay 2 is allowed (max_replays=2), replay 3 is refused.
        _, _, refusal = await _payload_call(core, carrier, "aa" * 32, 5)
        assert refusal is None
        late, _, refusal = await _payload_call(core, carrier, "aa" * 32, 5)
        assert refusal.kind == "already_exists" and "already replayed 2 times" in refusal.message
        assert "metering.max_replays" in refusal.message
        assert dict(late.response_metadata())["x-usage-output-tokens"] == "0"
        assert spans.get_finished_spans()[-1].status.status_code == StatusCode.ERROR
        # Telemetry agrees with the ledger: tokens of the two billed records only.
        assert [r.tenant for r in sink.records] == ["acme", "other"]
        billed = sum(r.billable_tokens for r in sink.records)
        assert metric_sum(reader, sc.METRIC_TOKENS) == billed == 6 + 3
        assert metric_sum(reader, sc.METRIC_REQUESTS, status="ok") == 4
        assert metric_sum(reader, sc.METRIC_REQUESTS, status="ALREADY_EXISTS") == 2
    finally:
        core.close()


async def test_http_refusal_status_is_409(telemetry) -> None:
    tel, spans, reader = telemetry
    core = MeteringCore(tel, ledger=IdempotentUsageSink())
    try:
        await _payload_call(core, {"x-request-id": "h-1"}, "aa" * 32, 1, protocol="http")
        _, _, refusal = await _payload_call(core, {"x-request-id": "h-1"}, "cc" * 32, 1,
                                            protocol="http")
        assert refusal.kind == "already_exists"
        span = spans.get_finished_spans()[-1]
        assert span.attributes[sc.HTTP_RESPONSE_STATUS_CODE] == 409
        assert metric_sum(reader, sc.METRIC_REQUESTS, status="409") == 1
    finally:
        core.close()


def test_max_replays_option() -> None:
    tel, _, _ = make_telemetry()
    try:
        assert MeteringCore.from_config({}, tel).max_replays == 10
        assert MeteringCore.from_config({"max_replays": 0}, tel).max_replays == 0
        for bad in (-1, "3", True, 2.5):
            with pytest.raises(ValueError, match="max_replays must be an integer"):
                MeteringCore.from_config({"max_replays": bad}, tel)
    finally:
        tel.shutdown()


async def test_ledger_health_metrics(telemetry) -> None:
    tel, _, reader = telemetry
    sink = IdempotentUsageSink()
    core = MeteringCore(tel, ledger=sink)
    try:
        sink.spool_pending, sink.write_failures = 7, 3
        await _model_call(core, {}, "abc")
        await _model_call(core, {}, "abcd")
        assert metric_sum(reader, sc.METRIC_LEDGER_SPOOL_PENDING) == 7
        assert metric_sum(reader, sc.METRIC_LEDGER_WRITE_FAILURES) == 3
        (commits,) = metric_points(reader, sc.METRIC_LEDGER_COMMIT_DURATION)
        assert commits.count == 2 and commits.sum == pytest.approx(0.004)
        assert tuple(commits.explicit_bounds) == sc.LEDGER_COMMIT_BUCKETS
        body = tel.render_metrics()[0].decode()
        values = {line.split("{")[0]: line.rsplit(" ", 1)[1] for line in body.splitlines()
                  if line.startswith("paddle_meter_ledger_")}
        assert values["paddle_meter_ledger_spool_pending"] == "7.0"
        assert values["paddle_meter_ledger_write_failures_total"] == "3.0"
        assert values["paddle_meter_ledger_commit_duration_seconds_count"] == "2.0"
    finally:
        core.close()
    sink.listeners[0](1.0, 1)  # after close: no longer recorded
    assert metric_points(reader, sc.METRIC_LEDGER_SPOOL_PENDING) == []


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
        with pytest.raises(ServingError) as refused:
            await _model_call(core, {}, "abc")
        assert (refused.value.kind, refused.value.message) == ("unavailable",
                                                               LEDGER_FAILURE_MESSAGE)
        assert isinstance(refused.value.__cause__, LedgerWriteError)
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
