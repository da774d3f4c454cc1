"""The metering fast paths against the plain OpenTelemetry SDK path, same assertions for both.

``TelemetryConfig.fast_path`` switches exporters/otel_fastpath.py's shortcuts (pre-aggregated
counters, merged histograms, wire-encoded OTLP spans) off. The metering core's own tests
(tests/test_metering_core.py) run here with each path, against in-memory readers and
exporters; then one workload is metered by both and their exported metrics and OTLP span
requests are compared. When these pass on a new SDK version, the pins in pyproject.toml
may be widened to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect

import pytest
import test_metering_core as core_tests
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_metering_core import IdempotentUsageSink, TestPriceBook

from exporters import semconv as sc
from exporters.otel import Telemetry, TelemetryConfig, setup_telemetry
from exporters.otel_fastpath import FastHistogram, PreAggregatedCounter
from interceptors.core import MeteringCore
from interceptors.instruments import PlainCounter, PlainHistogram
from models.usage import current_usage, report_usage, stage

MODES = {"fast_path": True, "plain_sdk": False}


def _telemetry(
    fast_path: bool, cfg: dict | None = None
) -> tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]:
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    base = TelemetryConfig.from_mapping(cfg or {"exporter": "none"}, env={})
    telemetry = setup_telemetry(
        dataclasses.replace(base, fast_path=fast_path),
        span_processors=[SimpleSpanProcessor(spans)],
        metric_readers=[reader],
    )
    return telemetry, spans, reader


@pytest.fixture(params=list(MODES.values()), ids=list(MODES))
def telemetry(request):
    tel, spans, reader = _telemetry(request.param)
    yield tel, spans, reader
    tel.shutdown()


CORE_CHECKS = [
    core_tests.test_resource_and_shutdown_idempotent,
    core_tests.test_record_ids_pricing_and_metrics,
    core_tests.test_frontend_request_id_and_app_status,
    core_tests.test_ledger_failure_raises,
    core_tests.test_prometheus_series_once_after_flushes,
    core_tests.test_replays_report_the_original_usage_and_count_once,
    core_tests.test_http_refusal_status_is_409,
    core_tests.test_ledger_that_cannot_accept_refuses_model_calls_at_start,
    core_tests.test_ledger_health_metrics,
]


@pytest.mark.parametrize("check", CORE_CHECKS, ids=lambda f: f.__name__)
async def test_core_assertions_hold_on_both_paths(telemetry, check) -> None:
    result = check(telemetry)
    if inspect.isawaitable(result):
        await result


def test_switch_picks_the_instruments(telemetry) -> None:
    tel, _, _ = telemetry
    core = MeteringCore(tel)
    try:
        ins = core.instruments
        if tel.config.fast_path:
            assert isinstance(ins.tokens, PreAggregatedCounter)
            assert isinstance(ins.requests, PreAggregatedCounter)
            assert isinstance(ins.rpc_duration, FastHistogram)
            assert isinstance(ins.http_duration, FastHistogram)
        else:
            assert isinstance(ins.tokens, PlainCounter)
            assert isinstance(ins.requests, PlainCounter)
            assert isinstance(ins.rpc_duration, PlainHistogram)
            assert isinstance(ins.http_duration, PlainHistogram)
    finally:
        core.close()


async def _workload(core: MeteringCore) -> None:
    """Model calls over both transports, a failure, an app error, a replay, a health call."""
    calls = [
        ("grpc", {"x-tenant": "a"}, "hello", True, None),
        ("grpc", {"x-tenant": "b"}, "abc", False, None),
        ("http", {"x-tenant": "a"}, "text", True, None),
        ("http", {"x-tenant": "c"}, "xy", True, "err_no=5000"),
        ("http", {"x-tenant": "c", "x-request-id": "twice"}, "xyz", True, None),
        ("http", {"x-tenant": "c", "x-request-id": "twice"}, "xyz", True, None),  # a replay
    ]
    for protocol, carrier, text, ok, app_status in calls:
        attrs = (
            {sc.RPC_SYSTEM: "grpc", sc.RPC_SERVICE: "t.S", sc.RPC_METHOD: "M"}
            if protocol == "grpc"
            else {sc.HTTP_REQUEST_METHOD: "POST", sc.URL_PATH: "/ocr/prediction"}
        )
        call = core.start_call(
            protocol=protocol, endpoint="/t", span_name="t", carrier=carrier, attributes=attrs
        )
        with call.activate():
            usage = current_usage()
            usage.model, usage.operation, usage.app_status = "ocr", "ocr", app_status

            def infer(text: str = text) -> None:
                with stage(sc.STAGE_OCR_REC):
                    report_usage(input_tokens=1, output_tokens=len(text), characters=len(text))

            await asyncio.to_thread(infer)
        status = ("OK" if ok else "INTERNAL") if protocol == "grpc" else ("200" if ok else "500")
        code = (
            {sc.RPC_GRPC_STATUS_CODE: 0 if ok else 13}
            if protocol == "grpc"
            else {sc.HTTP_RESPONSE_STATUS_CODE: 200 if ok else 500}
        )
        await call.finish(
            ok=ok,
            status=status,
            request_bytes=100 * len(text),
            response_bytes=7,
            transport_attributes={**attrs, **code},
        )
    health = core.start_call(
        protocol="grpc",
        endpoint="/grpc.health.v1.Health/Check",
        span_name="h",
        carrier={},
        attributes={sc.RPC_SYSTEM: "grpc"},
        operation="health",
    )
    await health.finish(ok=True, status="OK", transport_attributes={sc.RPC_GRPC_STATUS_CODE: 0})


def _metrics(reader: InMemoryMetricReader) -> dict[str, set]:
    """Every exported series, timing values left out (they differ from run to run)."""
    timed = {
        sc.METRIC_GEN_AI_SERVER_REQUEST_DURATION,
        sc.METRIC_RPC_SERVER_CALL_DURATION,
        sc.METRIC_HTTP_SERVER_REQUEST_DURATION,
    }
    out: dict[str, set] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    attrs = frozenset(p.attributes.items())
                    if not hasattr(p, "explicit_bounds"):
                        value: tuple = (p.value,)
                    elif metric.name in timed:
                        value = (p.count, tuple(p.explicit_bounds))
                    else:
                        value = (p.count, p.sum, tuple(p.bucket_counts), p.min, p.max)
                    out.setdefault(metric.name, set()).add((sm.scope.name, attrs, value))
    return out


async def test_both_paths_export_the_same_metrics() -> None:
    exported = {}
    for mode, fast_path in MODES.items():
        tel, _, reader = _telemetry(fast_path)
        core = MeteringCore(tel, ledger=IdempotentUsageSink(), pricebook=TestPriceBook())
        try:
            await _workload(core)
            exported[mode] = _metrics(reader)
            # billed tokens of the three billed calls, (1 + 5), (1 + 4) and (1 + 3): the
            # replay adds nothing
            assert core_tests.metric_sum(reader, sc.METRIC_TOKENS) == 15
            assert core_tests.metric_sum(reader, sc.METRIC_REQUESTS) == 7
        finally:
            core.close()
            tel.shutdown()
    fast, plain = exported["fast_path"], exported["plain_sdk"]
    assert set(fast) == set(plain)
    for name in fast:
        assert fast[name] == plain[name], name


async def test_both_span_exporters_build_the_same_otlp_request() -> None:
    # Real server and stage spans of the workload, recorded in memory.
    tel, spans, _ = _telemetry(True)
    core = MeteringCore(tel, ledger=IdempotentUsageSink(), pricebook=TestPriceBook())
    try:
        await _workload(core)
    finally:
        core.close()
        tel.shutdown()
    finished = list(spans.get_finished_spans())
    assert len(finished) == 13  # 6 model calls + their stages + 1 health call
    requests = {}
    otlp = {
        "exporter": "otlp",
        "otlp_endpoint": "http://127.0.0.1:9",  # never reached: nothing is exported
        "otlp_timeout_s": 0.5,
        "metric_export_interval_s": 3600,
        "prometheus": False,
    }
    for mode, fast_path in MODES.items():
        otlp_tel, _, _ = _telemetry(fast_path, otlp)
        try:
            exporter = otlp_tel.span_exporter
            assert isinstance(exporter, OTLPSpanExporter)
            assert (type(exporter) is OTLPSpanExporter) is not fast_path
            # _translate_data is the SDK hook the fast path overrides: compare through it.
            requests[mode] = exporter._translate_data(finished)
        finally:
            otlp_tel.shutdown()
    assert requests["fast_path"] == requests["plain_sdk"]
    assert requests["fast_path"].SerializeToString(deterministic=True) == (
        requests["plain_sdk"].SerializeToString(deterministic=True)
    )
