"""The ASGI middleware around a real FastAPI app under uvicorn (port 0), real httpx client.

The app's infer route behaves like a model frontend (fills ``current_usage()``, runs the
model in ``asyncio.to_thread`` inside ``stage()``); the checks mirror the gRPC ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from test_metering_core import IdempotentUsageSink, InMemoryUsageSink, make_telemetry, metric_sum

from exporters import semconv as sc
from interceptors import (
    LEDGER_FAILURE_MESSAGE,
    START_FAILURE_MESSAGE,
    MeteringCore,
    MeteringMiddleware,
)
from interceptors.billing_policy import LEDGER_CANNOT_ACCEPT_MESSAGE
from models.usage import current_usage, report_usage, stage

# Every request the app's infer route saw (to prove a refused request never ran it).
HANDLED: list[str] = []


def _render_in_body(kind: str, message: str) -> tuple[int, bytes]:
    """A frontend's error_renderer, as the pipeline answers errors in its body."""
    return 200, json.dumps({"err_no": 5000, "err_msg": f"{kind}: {message}"}).encode()


def _build_app(core: MeteringCore) -> MeteringMiddleware:
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> JSONResponse:
        usage = current_usage()
        payload = json.loads(await request.body())
        text = payload["text"]
        HANDLED.append(text)
        if usage is not None:
            usage.model, usage.operation = name, "ocr"
            usage.content_sha256 = hashlib.sha256(text.encode()).hexdigest()
            if payload.get("pipe"):
                usage.error_renderer = _render_in_body
        if text == "bad":
            raise HTTPException(status_code=400, detail="no image")
        if text == "crash":
            raise RuntimeError("model exploded")

        def run() -> str:
            with stage(sc.STAGE_OCR_REC):
                report_usage(output_tokens=len(text), characters=len(text), images=1)
            return text.upper()

        return JSONResponse({"text": await asyncio.to_thread(run)})

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> JSONResponse:
        return JSONResponse({"name": name})

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = core.telemetry.render_metrics()
        return Response(body, media_type=content_type)

    return MeteringMiddleware(app, core)


class Env:
    def __init__(self, *, sink_fails: bool = False, enabled: bool = True,
                 telemetry=None, ledger=None, tenant_resolver=None) -> None:
        self.telemetry, self.spans, self.reader = (
            make_telemetry() if telemetry is None else (telemetry, None, None))
        self.sink = ledger or InMemoryUsageSink(fail=sink_fails)
        extra = {"tenant_resolver": tenant_resolver} if tenant_resolver else {}
        self.core = MeteringCore(self.telemetry if enabled else None, ledger=self.sink,
                                 enabled=enabled, **extra)
        if not enabled:
            self.core.telemetry = self.telemetry  # /metrics still served
        self.client_tracer = TracerProvider().get_tracer("test-client")

    async def __aenter__(self) -> Env:
        config = uvicorn.Config(_build_app(self.core), host="127.0.0.1", port=0,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        self.server.should_exit = True
        await self.task
        self.core.close()
        self.telemetry.shutdown()

    async def infer(self, text: str, headers: dict | None = None, *, pipe: bool = False):
        with self.client_tracer.start_as_current_span("client", kind=SpanKind.CLIENT) as span:
            carrier = dict(headers or {})
            TraceContextTextMapPropagator().inject(carrier, set_span_in_context(span))
            body = json.dumps({"text": text, **({"pipe": True} if pipe else {})}).encode()
            response = await self.client.post("/v2/models/ocr/infer", content=body,
                                              headers=carrier)
        return span, body, response

    def server_spans(self):
        return [s for s in self.spans.get_finished_spans() if s.kind == SpanKind.SERVER]


async def test_trace_usage_sizes_and_headers() -> None:
    async with Env() as env:
        client_span, body, response = await env.infer(
            "hello world", {"x-request-id": "req-9", "x-tenant": "acme"})
        assert response.status_code == 200 and response.json() == {"text": "HELLO WORLD"}
        h = response.headers
        assert (h["x-request-id"], h["x-usage-output-tokens"], h["x-usage-input-tokens"]) == (
            "req-9", "11", "0")
        (server,) = env.server_spans()
        assert server.name == "POST /v2/models/{name}/infer"
        assert server.context.trace_id == client_span.context.trace_id
        assert server.parent.span_id == client_span.context.span_id
        (rec_stage,) = [s for s in env.spans.get_finished_spans() if s.name == "ocr.rec"]
        assert rec_stage.parent.span_id == server.context.span_id
        a = server.attributes
        assert a[sc.HTTP_ROUTE] == "/v2/models/{name}/infer"
        assert a[sc.HTTP_RESPONSE_STATUS_CODE] == 200 and a[sc.URL_PATH] == "/v2/models/ocr/infer"
        assert a[sc.PADDLE_METER_REQUEST_SIZE] == len(body)
        assert a[sc.PADDLE_METER_RESPONSE_SIZE] == len(response.content)
        assert a[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 11
        (record,) = env.sink.records
        assert (record.request_id, record.tenant, record.status, record.billable_tokens) == (
            "req-9", "acme", "ok", 11)
        assert record.endpoint == "/v2/models/{name}/infer" and record.protocol == "http"
        assert (record.request_bytes, record.response_bytes) == (len(body), len(response.content))
        assert metric_sum(env.reader, sc.METRIC_HTTP_SERVER_REQUEST_DURATION) > 0

        # /metrics and health are not metered, and /metrics shows the same sums.
        metrics = await env.client.get("/metrics")
        assert (await env.client.get("/v2/health/live")).status_code == 200
        assert "x-request-id" not in metrics.headers
        assert len(env.server_spans()) == 1
        line = next(ln for ln in metrics.text.splitlines()
                    if ln.startswith("paddle_meter_tokens_total{"))
        assert float(line.rsplit(" ", 1)[1]) == metric_sum(env.reader, sc.METRIC_TOKENS) == 11


async def test_failed_requests_are_error_spans_with_zero_billable() -> None:
    async with Env() as env:
        _, _, bad = await env.infer("bad")
        _, _, crash = await env.infer("crash")
        assert (bad.status_code, crash.status_code) == (400, 500)
        assert bad.headers["x-usage-output-tokens"] == "0" and "x-request-id" in crash.headers
        spans = env.server_spans()
        assert [s.status.status_code for s in spans] == [StatusCode.ERROR] * 2
        assert [r.status for r in env.sink.records] == ["400", "500"]
        assert [r.billable_tokens for r in env.sink.records] == [0, 0]
        assert metric_sum(env.reader, sc.METRIC_REQUESTS, status="400") == 1


async def test_ledger_failure_answers_503() -> None:
    async with Env(sink_fails=True) as env:
        _, _, response = await env.infer("hello", {"x-request-id": "again-2"})
        assert response.status_code == 503
        assert response.json() == {"error": LEDGER_FAILURE_MESSAGE}
        assert response.headers["x-request-id"] == "again-2"
        assert response.headers["retry-after"] == "1"


async def test_metering_off_passes_through() -> None:
    async with Env(enabled=False) as env:
        _, _, response = await env.infer("hello")
        assert response.status_code == 200 and "x-request-id" not in response.headers
        assert len(env.spans.get_finished_spans()) == 0 and env.sink.records == []


async def test_metering_that_cannot_start_serves_nothing() -> None:
    def broken_resolver(carrier):
        raise RuntimeError("auth backend down")

    async with Env(tenant_resolver=broken_resolver) as env:
        HANDLED.clear()
        _, _, response = await env.infer("hello", {"x-request-id": "start-2"})
        assert response.status_code == 503
        assert response.json() == {"error": START_FAILURE_MESSAGE}
        assert response.headers["retry-after"] == "1"
        assert HANDLED == [] and env.sink.records == [] and env.server_spans() == []
        assert metric_sum(env.reader, sc.METRIC_METER_ERRORS, where="start") == 1


async def test_malformed_id_or_tenant_is_refused_before_the_app() -> None:
    async with Env() as env:
        HANDLED.clear()
        for headers, needle in (({"x-request-id": "bad id"}, "x-request-id must be"),
                                ({"x-tenant": "a" * 65}, "x-tenant must be")):
            _, _, response = await env.infer("hello", headers)
            assert response.status_code == 400
            error = response.json()["error"]
            assert needle in error and next(iter(headers.values())) not in error
        assert HANDLED == [] and env.sink.records == []


async def test_ledger_that_cannot_accept_answers_503_before_the_app() -> None:
    sink = IdempotentUsageSink()
    async with Env(ledger=sink) as env:
        sink.accepting = False
        HANDLED.clear()
        _, _, response = await env.infer("hello")
        assert response.status_code == 503
        assert response.json() == {"error": LEDGER_CANNOT_ACCEPT_MESSAGE}
        assert HANDLED == []
        assert (await env.client.get("/v2/models/ocr")).status_code == 200  # a read: answered


async def test_replay_conflict_and_renderer_over_http() -> None:
    sink = IdempotentUsageSink()
    async with Env(ledger=sink) as env:
        ids = {"x-request-id": "http-same", "x-tenant": "acme"}
        _, _, first = await env.infer("hello", ids)
        assert first.status_code == 200 and "x-usage-replay" not in first.headers
        _, _, again = await env.infer("hello", ids)
        assert again.status_code == 200 and again.json() == {"text": "HELLO"}
        assert again.headers["x-usage-replay"] == "true"
        assert again.headers["x-usage-output-tokens"] == "5"

        _, _, other = await env.infer("other payload", ids)
        assert other.status_code == 409
        assert other.json() == {"error": (
            "x-request-id 'http-same' was already used by tenant 'acme' for a different"
            " payload; send a new x-request-id")}
        assert other.headers["x-usage-output-tokens"] == "0"
        assert "OTHER PAYLOAD" not in other.text

        _, _, piped = await env.infer("other payload", ids, pipe=True)
        assert piped.status_code == 200 and piped.json()["err_no"] == 5000
        assert piped.json()["err_msg"].startswith("already_exists: x-request-id 'http-same'")
        assert "OTHER PAYLOAD" not in piped.text
        assert len(sink.records) == 1
        assert metric_sum(env.reader, sc.METRIC_TOKENS) == 5  # the ledger's sum
        assert metric_sum(env.reader, sc.METRIC_REQUESTS, status="409") == 2
