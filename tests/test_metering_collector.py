"""End to end through a REAL collector: our server -> OTLP -> rotel-agent -> OtlpSink.

Both transports (the test gRPC service and the FastAPI app of the sibling tests), both
OTLP protocols. Asserts trace continuity, usage attributes, metric sums equal at the
collector and at Prometheus ``/metrics``, and that a stopped collector costs requests
nothing. Every test uses its own service name and tenant so module-shared sinks are
told apart.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from support.fixtures import collector, otlp_sink  # noqa: F401 - pytest fixtures
from test_metering_grpc import Env as GrpcEnv
from test_metering_http import Env as HttpEnv

from exporters import semconv as sc
from exporters.otel import Telemetry, TelemetryConfig, setup_telemetry


def _telemetry(collector, protocol: str) -> tuple[Telemetry, str]:  # noqa: F811
    service = f"pm-test-{uuid.uuid4().hex[:8]}"
    cfg = TelemetryConfig.from_mapping(
        {"service_name": service, "metric_export_interval_s": 0.2, "otlp_timeout_s": 2},
        env=collector.otel_env(protocol),
    )
    assert cfg.exporter == "otlp"
    return setup_telemetry(cfg), service


def _prometheus_sum(telemetry: Telemetry, family: str, tenant: str) -> float:
    body, _ = telemetry.render_metrics()
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(family + "{") and f'paddle_meter_tenant="{tenant}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _check_traces(otlp_sink, service: str, clients: list, n_ok: int) -> list[dict]:  # noqa: F811
    def ours(span: dict) -> bool:
        return span["resource"].get("service.name") == service

    servers = otlp_sink.wait_for_spans(lambda s: ours(s) and s["kind"] == "SERVER",
                                       count=len(clients))
    stages = otlp_sink.wait_for_spans(lambda s: ours(s) and s["name"] == "ocr.rec", count=n_ok)
    by_parent = {s["parent_span_id"]: s for s in servers}
    for client_span in clients:
        server = by_parent[format(client_span.context.span_id, "016x")]
        assert server["trace_id"] == format(client_span.context.trace_id, "032x")
    server_ids = {s["span_id"] for s in servers}
    assert all(s["parent_span_id"] in server_ids for s in stages)
    assert servers[0]["resource"]["service.instance.id"]
    return servers


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_grpc_calls_reach_the_collector(collector, otlp_sink, protocol) -> None:  # noqa: F811
    telemetry, service = _telemetry(collector, protocol)
    tenant = uuid.uuid4().hex[:12]
    texts = ["hello world", "abc", "abort"]
    async with GrpcEnv(telemetry=telemetry) as env:
        clients = []
        for text in texts:
            span, call = await env.call(text, (("x-tenant", tenant),))
            clients.append(span)
        await asyncio.to_thread(telemetry.force_flush, 5)
        servers = _check_traces(otlp_sink, service, clients, n_ok=2)
        tokens = {s["attributes"][sc.PADDLE_METER_REQUEST_ID]:
                  s["attributes"][sc.GEN_AI_USAGE_OUTPUT_TOKENS] for s in servers}
        assert sorted(tokens.values()) == [0, 3, 11]
        errors = [s for s in servers if s["status_code"] == "ERROR"]
        assert len(errors) == 1 and errors[0]["attributes"][sc.PADDLE_METER_BILLABLE_TOKENS] == 0
        want = {sc.PADDLE_METER_TENANT: tenant}
        otlp_sink.wait_for_metric_sum(sc.METRIC_TOKENS, 14, **want)
        otlp_sink.wait_for_metric_sum(sc.METRIC_REQUESTS, 3, **want)
        assert _prometheus_sum(telemetry, "paddle_meter_tokens_total", tenant) == 14
        assert _prometheus_sum(telemetry, "paddle_meter_requests_total", tenant) == 3
        assert [r.billable_tokens for r in env.sink.records] == [11, 3, 0]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_http_calls_reach_the_collector(collector, otlp_sink, protocol) -> None:  # noqa: F811
    telemetry, service = _telemetry(collector, protocol)
    tenant = uuid.uuid4().hex[:12]
    async with HttpEnv(telemetry=telemetry) as env:
        clients, sizes = [], []
        for text in ["hello world", "abc", "bad"]:
            span, body, response = await env.infer(text, {"x-tenant": tenant})
            clients.append(span)
            sizes.append((len(body), len(response.content)))
        await asyncio.to_thread(telemetry.force_flush, 5)
        servers = _check_traces(otlp_sink, service, clients, n_ok=2)
        seen = sorted((s["attributes"][sc.PADDLE_METER_REQUEST_SIZE],
                       s["attributes"][sc.PADDLE_METER_RESPONSE_SIZE]) for s in servers)
        assert seen == sorted(sizes)
        want = {sc.PADDLE_METER_TENANT: tenant}
        otlp_sink.wait_for_metric_sum(sc.METRIC_TOKENS, 14, **want)
        otlp_sink.wait_for_metric_sum(sc.METRIC_REQUESTS, 1, status="400", **want)
        assert _prometheus_sum(telemetry, "paddle_meter_tokens_total", tenant) == 14


async def test_stopped_collector_costs_requests_nothing(collector, otlp_sink) -> None:  # noqa: F811
    telemetry, service = _telemetry(collector, "grpc")
    async with GrpcEnv(telemetry=telemetry) as env:
        collector.stop()
        try:
            for _ in range(10):
                # A hang guard, not a benchmark: no call may wait on the exporter.
                _, call = await asyncio.wait_for(env.call("hello"), timeout=10)
                assert (await call).value == "HELLO"
            assert len(env.sink.records) == 10
        finally:
            collector.start()
        client, _ = await env.call("back again")
        await asyncio.to_thread(telemetry.force_flush, 5)
        otlp_sink.wait_for_spans(
            lambda s: s["resource"].get("service.name") == service
            and s["parent_span_id"] == format(client.context.span_id, "016x"))
