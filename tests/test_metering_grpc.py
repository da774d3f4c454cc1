"""The grpc.aio interceptor against a real server on port 0 and a real grpc.aio client.

The test service (``test.Ocr``, google.protobuf StringValue in and out) behaves like a
model frontend: it fills ``current_usage()``, runs "inference" in ``asyncio.to_thread``
inside ``stage()`` and reports usage, so the whole contract is exercised on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import sqlite3

import grpc
import grpc.aio
import pytest
from google.protobuf.wrappers_pb2 import StringValue
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from test_metering_core import (
    IdempotentUsageSink,
    InMemoryUsageSink,
    make_telemetry,
    metric_points,
    metric_sum,
)
from tritonclient.grpc import service_pb2 as oip_pb

from exporters import semconv as sc
from exporters.otel import TelemetryConfig, setup_telemetry
from interceptors import (
    LEDGER_FAILURE_MESSAGE,
    START_FAILURE_MESSAGE,
    MeteringCore,
    MeteringServerInterceptor,
)
from interceptors.billing_policy import LEDGER_CANNOT_ACCEPT_MESSAGE
from models.usage import current_usage, report_usage, stage

# Every request the test service's handler saw (to prove a refused call never ran it).
HANDLED: list[str] = []


def _render_in_body(kind: str, message: str) -> StringValue:
    """A frontend's error_renderer, as the pipeline answers errors in its body."""
    return StringValue(value=f"refused {kind}: {message}")


async def _recognize(request: StringValue, context: grpc.aio.ServicerContext) -> StringValue:
    HANDLED.append(request.value)
    usage = current_usage()
    text = request.value
    if usage is not None:  # None when metering is off: frontends must allow for it
        usage.model, usage.operation, usage.model_version = "ocr", "ocr", "1"
        usage.content_sha256 = hashlib.sha256(text.removeprefix("pipe:").encode()).hexdigest()
        if text.startswith("pipe:"):
            usage.error_renderer = _render_in_body
    if text == "abort":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no image")
    if text == "crash":
        raise RuntimeError("model exploded")
    if text == "slow":
        await asyncio.sleep(30)
    if text == "app-error" and usage is not None:
        usage.app_status = "err_no=3002"
        return StringValue(value="")

    def infer() -> str:
        with stage(sc.STAGE_OCR_DET):
            pass
        with stage(sc.STAGE_OCR_REC):
            report_usage(output_tokens=len(text), characters=len(text), images=1)
        return text.upper()

    context.set_trailing_metadata((("x-frontend", "yes"),))
    return StringValue(value=await asyncio.to_thread(infer))


def _handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "test.Ocr",
        {
            "Recognize": grpc.unary_unary_rpc_method_handler(
                _recognize,
                request_deserializer=StringValue.FromString,
                response_serializer=StringValue.SerializeToString,
            )
        },
    )


async def _server_live(request: oip_pb.ServerLiveRequest, context) -> oip_pb.ServerLiveResponse:
    return oip_pb.ServerLiveResponse(live=True)


def _oip_handler() -> grpc.GenericRpcHandler:
    """OIP's ServerLive, as serving/oip_grpc.py answers it."""
    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ServerLive": grpc.unary_unary_rpc_method_handler(
                _server_live,
                request_deserializer=oip_pb.ServerLiveRequest.FromString,
                response_serializer=oip_pb.ServerLiveResponse.SerializeToString,
            )
        },
    )


async def _serve(core: MeteringCore) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[MeteringServerInterceptor(core)])
    server.add_generic_rpc_handlers((_handler(), _oip_handler()))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection(("test.Ocr", reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


class Env:
    def __init__(self, *, sink_fails: bool = False, enabled: bool = True, telemetry=None,
                 tenant_resolver=None, ledger=None):
        if telemetry is None:
            telemetry, self.spans, self.reader = make_telemetry()
        self.telemetry = telemetry
        self.sink = ledger or InMemoryUsageSink(fail=sink_fails)
        extra = {"tenant_resolver": tenant_resolver} if tenant_resolver else {}
        self.core = MeteringCore(telemetry if enabled else None, ledger=self.sink,
                                 enabled=enabled, **extra)
        self.client_tracer = TracerProvider().get_tracer("test-client")

    async def __aenter__(self) -> Env:
        self.server, target = await _serve(self.core)
        self.channel = grpc.aio.insecure_channel(target)
        self.recognize = self.channel.unary_unary(
            "/test.Ocr/Recognize",
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(None)
        self.core.close()
        self.telemetry.shutdown()

    async def call(self, text: str, metadata: tuple = ()):
        """Call with a client span's traceparent; returns (client span, call)."""
        with self.client_tracer.start_as_current_span("client", kind=SpanKind.CLIENT) as span:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier, set_span_in_context(span))
            call = self.recognize(StringValue(value=text),
                                  metadata=tuple(carrier.items()) + metadata)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
        return span, call

    def server_spans(self):
        return [s for s in self.spans.get_finished_spans() if s.kind == SpanKind.SERVER]


async def test_trace_usage_sizes_and_trailers() -> None:
    async with Env() as env:
        request = StringValue(value="hello world")
        client_span, call = await env.call(request.value, (("x-request-id", "req-1"),
                                                           ("x-tenant", "acme")))
        response = await call
        assert await call.code() == grpc.StatusCode.OK
        trailers = dict(await call.trailing_metadata())
        assert trailers["x-request-id"] == "req-1"
        assert trailers["x-usage-output-tokens"] == "11"
        assert trailers["x-usage-input-tokens"] == "0"
        assert trailers["x-frontend"] == "yes"  # the handler's own trailers are kept

        (server,) = env.server_spans()
        assert server.name == "test.Ocr/Recognize"
        assert server.context.trace_id == client_span.context.trace_id
        assert server.parent.span_id == client_span.context.span_id
        stages = {s.name: s for s in env.spans.get_finished_spans() if s.name.startswith("ocr.")}
        assert set(stages) == {"ocr.det", "ocr.rec"}
        assert all(s.parent.span_id == server.context.span_id for s in stages.values())
        a = server.attributes
        assert a[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 11 and a[sc.PADDLE_METER_BILLABLE_TOKENS] == 11
        assert a[sc.PADDLE_METER_REQUEST_SIZE] == len(request.SerializeToString())
        assert a[sc.PADDLE_METER_RESPONSE_SIZE] == len(response.SerializeToString())
        assert (a[sc.RPC_SERVICE], a[sc.RPC_METHOD], a[sc.RPC_GRPC_STATUS_CODE]) == (
            "test.Ocr", "Recognize", 0)
        assert (a[sc.PADDLE_METER_TENANT], a[sc.PADDLE_METER_REQUEST_ID]) == ("acme", "req-1")
        assert a[sc.GEN_AI_REQUEST_MODEL] == "ocr"

        (record,) = env.sink.records
        assert (record.request_id, record.tenant, record.status) == ("req-1", "acme", "ok")
        assert record.request_bytes == len(request.SerializeToString())
        assert record.response_bytes == len(response.SerializeToString())
        assert record.trace_id == format(client_span.context.trace_id, "032x")
        assert record.endpoint == "/test.Ocr/Recognize" and record.protocol == "grpc"
        assert metric_sum(env.reader, sc.METRIC_TOKENS) == 11
        assert metric_sum(env.reader, sc.METRIC_RPC_SERVER_CALL_DURATION) > 0
        (gen_ai,) = metric_points(env.reader, sc.METRIC_GEN_AI_SERVER_REQUEST_DURATION)
        assert tuple(gen_ai.explicit_bounds) == sc.GEN_AI_DURATION_BUCKETS
        (size,) = metric_points(env.reader, sc.METRIC_REQUEST_SIZE)
        assert size.sum == len(request.SerializeToString())


@pytest.mark.parametrize(
    ("text", "code", "status"),
    [
        ("abort", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("crash", grpc.StatusCode.UNKNOWN, "UNKNOWN"),
        ("app-error", grpc.StatusCode.OK, "err_no=3002"),
    ],
)
async def test_failed_calls_are_error_spans_with_zero_billable(text, code, status) -> None:
    async with Env() as env:
        _, call = await env.call(text)
        assert await call.code() == code
        trailers = dict(await call.trailing_metadata())
        assert len(trailers["x-request-id"]) == 32 and trailers["x-usage-output-tokens"] == "0"
        (server,) = env.server_spans()
        assert server.status.status_code == StatusCode.ERROR
        assert server.attributes[sc.PADDLE_METER_BILLABLE_TOKENS] == 0
        (record,) = env.sink.records
        assert (record.status, record.billable_tokens) == (status, 0)
        assert metric_sum(env.reader, sc.METRIC_REQUESTS, status=status) == 1


async def test_ledger_failure_fails_the_call() -> None:
    async with Env(sink_fails=True) as env:
        _, call = await env.call("hello", (("x-request-id", "again-1"),))
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert await call.details() == LEDGER_FAILURE_MESSAGE
        trailers = dict(await call.trailing_metadata())
        assert trailers["x-request-id"] == "again-1" and trailers["retry-after"] == "1"
        (server,) = env.server_spans()
        assert server.attributes[sc.RPC_GRPC_STATUS_CODE] == 14


async def test_health_is_metered_but_never_billed() -> None:
    async with Env() as env:
        stub = health_pb2_grpc.HealthStub(env.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        (server,) = env.server_spans()
        assert server.attributes[sc.GEN_AI_OPERATION_NAME] == "health"
        assert env.sink.records == []


async def test_reflection_stream_is_metered_but_never_billed() -> None:
    async with Env() as env:
        stub = reflection_pb2_grpc.ServerReflectionStub(env.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]
        names = [s.name for s in replies[0].list_services_response.service]
        assert "test.Ocr" in names
        (server,) = env.server_spans()
        assert server.attributes[sc.GEN_AI_OPERATION_NAME] == "reflection"
        assert server.attributes[sc.PADDLE_METER_RESPONSE_SIZE] == len(
            replies[0].SerializeToString())
        assert env.sink.records == []


async def test_metering_off_passes_through() -> None:
    telemetry, spans, _ = make_telemetry()
    async with Env(enabled=False, telemetry=telemetry) as env:
        _, call = await env.call("hello")
        assert (await call).value == "HELLO"
        assert "x-request-id" not in dict(await call.trailing_metadata())
    assert len(spans.get_finished_spans()) == 0
    assert env.sink.records == []


async def test_dead_collector_costs_requests_nothing() -> None:
    with socket.socket() as s:  # a port nothing listens on: every export is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = TelemetryConfig.from_mapping(
        {"exporter": "otlp", "otlp_endpoint": f"http://127.0.0.1:{port}", "otlp_timeout_s": 2,
         "metric_export_interval_s": 0.1}, env={})
    telemetry = setup_telemetry(cfg)
    async with Env(telemetry=telemetry) as env:
        # A hang guard, not a benchmark: no call may wait on the exporter's retries.
        for _ in range(20):
            _, call = await asyncio.wait_for(env.call("hello"), timeout=10)
            assert (await call).value == "HELLO"
        assert len(env.sink.records) == 20


async def test_client_cancel_is_recorded_as_cancelled() -> None:
    async with Env() as env:
        call = env.recognize(StringValue(value="slow"), timeout=0.3)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(200):  # the server side notices the deadline on its own schedule
            if env.sink.records:
                break
            await asyncio.sleep(0.05)
        (record,) = env.sink.records
        assert (record.status, record.billable_tokens) == ("CANCELLED", 0)


async def test_metering_that_cannot_start_serves_nothing(caplog) -> None:
    def broken_resolver(carrier):
        raise RuntimeError("auth backend down")

    async with Env(tenant_resolver=broken_resolver) as env:
        HANDLED.clear()
        with caplog.at_level(logging.ERROR, logger="interceptors.core"):
            _, call = await env.call("hello", (("x-request-id", "start-1"),))
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert await call.details() == START_FAILURE_MESSAGE
        assert dict(await call.trailing_metadata())["retry-after"] == "1"
        assert HANDLED == []  # the handler never ran: nothing was served
        assert env.sink.records == [] and env.server_spans() == []
        assert metric_sum(env.reader, sc.METRIC_METER_ERRORS, where="start") == 1
        assert any("broken_resolver" in getattr(r, "stack", "") for r in caplog.records)


@pytest.mark.parametrize(("metadata", "needle"), [
    ((("x-request-id", "bad id"),), "x-request-id must be"),
    ((("x-request-id", "x" * 129),), "x-request-id must be"),
    ((("x-tenant", "no/slashes"),), "x-tenant must be"),
])
async def test_malformed_id_or_tenant_is_refused_before_the_handler(metadata, needle) -> None:
    async with Env() as env:
        HANDLED.clear()
        _, call = await env.call("hello", metadata)
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = await call.details()
        assert needle in details and metadata[0][1] not in details
        assert HANDLED == [] and env.sink.records == []


async def test_ledger_that_cannot_accept_refuses_before_the_handler() -> None:
    sink = IdempotentUsageSink()
    async with Env(ledger=sink) as env:
        sink.accepting = False
        HANDLED.clear()
        _, call = await env.call("hello")
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert await call.details() == LEDGER_CANNOT_ACCEPT_MESSAGE
        assert HANDLED == []
        reply = await health_pb2_grpc.HealthStub(env.channel).Check(
            health_pb2.HealthCheckRequest())  # never billed: still answered
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        live = env.channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=oip_pb.ServerLiveRequest.SerializeToString,
            response_deserializer=oip_pb.ServerLiveResponse.FromString)
        assert (await live(oip_pb.ServerLiveRequest())).live
        assert env.server_spans()[-1].attributes[sc.GEN_AI_OPERATION_NAME] == "health"


async def test_replay_conflict_and_renderer_over_grpc() -> None:
    sink = IdempotentUsageSink()
    async with Env(ledger=sink) as env:
        ids = (("x-request-id", "grpc-same"), ("x-tenant", "acme"))
        _, first = await env.call("hello", ids)
        assert (await first).value == "HELLO"
        assert "x-usage-replay" not in dict(await first.trailing_metadata())
        _, again = await env.call("hello", ids)
        assert (await again).value == "HELLO"  # served again: a retry gets its answer
        trailers = dict(await again.trailing_metadata())
        assert trailers["x-usage-replay"] == "true" and trailers["x-usage-output-tokens"] == "5"
        assert env.server_spans()[-1].attributes[sc.PADDLE_METER_USAGE_REPLAY] is True

        _, other = await env.call("other payload", ids)
        assert await other.code() == grpc.StatusCode.ALREADY_EXISTS
        assert await other.details() == (
            "x-request-id 'grpc-same' was already used by tenant 'acme' for a different"
            " payload; send a new x-request-id")
        assert dict(await other.trailing_metadata())["x-usage-output-tokens"] == "0"

        # A frontend that answers errors in its body: OK, its message, no model result.
        _, piped = await env.call("pipe:other payload", ids)
        assert await piped.code() == grpc.StatusCode.OK
        answer = (await piped).value
        assert answer.startswith("refused already_exists: x-request-id 'grpc-same'")
        assert "OTHER PAYLOAD" not in answer
        assert len(sink.records) == 1
        assert metric_sum(env.reader, sc.METRIC_TOKENS) == 5  # the ledger's sum


async def test_real_sqlite_ledger_one_row_per_request_id(tmp_path) -> None:
    from exporters.ledger import open_ledger

    ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
    try:
        async with Env(ledger=ledger) as env:
            replayed = []
            for rid in ("a-1", "a-1", "b-2"):  # a client retry reuses its request id
                _, call = await env.call("hello", (("x-request-id", rid),))
                assert await call.code() == grpc.StatusCode.OK
                replayed.append(dict(await call.trailing_metadata()).get("x-usage-replay"))
            assert replayed == [None, "true", None]
    finally:
        ledger.shutdown()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        rows = db.execute("SELECT request_id, billable_tokens, status, trace_id"
                          " FROM usage_records ORDER BY request_id").fetchall()
    assert [r[:3] for r in rows] == [("a-1", 5, "ok"), ("b-2", 5, "ok")]
    assert all(len(r[3]) == 32 for r in rows)
