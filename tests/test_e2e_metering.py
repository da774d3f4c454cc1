"""End to end metering: the real server process exports OTLP to the real rotel collector,
which forwards to a receiver in the test; the ledger is a real database (SQLite, and
PostgreSQL on this machine's server).

Every assertion compares what the server reported with what the client actually sent
and received: trace ids, byte counts, character counts, metric sums and ledger rows.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import sqlite3
import uuid

import grpc
import httpx
import numpy as np
import psycopg
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from imaging import CORPUS, render_line
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from support.collector import OtlpSink, RotelCollector
from support.pg import temporary_database
from support.server import ServerProcess

from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc

CLIENT_TRACER = TracerProvider().get_tracer("e2e-client")
FAST_EXPORT = {
    "OTEL_METRIC_EXPORT_INTERVAL": "300",
    "OTEL_BSP_SCHEDULE_DELAY": "100",
}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request, tmp_path_factory):
    """(server, sink, collector, ledger_url) with the ledger of the param's kind."""
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(OtlpSink())
        collector = stack.enter_context(RotelCollector(sink.endpoint))
        workdir = tmp_path_factory.mktemp(f"e2e-{request.param}")
        if request.param == "sqlite":
            url = str(workdir / "ledger.sqlite3")
        else:
            url = stack.enter_context(temporary_database("pm_e2e"))
        server = ServerProcess(
            workdir,
            {"ledger": {"url": url}},
            env={**collector.otel_env("grpc"), **FAST_EXPORT},
        )
        stack.enter_context(server)
        yield server, sink, collector, url


def _ledger_rows(url: str, where: str = "", params: tuple = ()) -> list[dict]:
    query = f"SELECT * FROM usage_records {where}"
    if url.startswith("postgresql://"):
        with psycopg.connect(url) as conn:
            cur = conn.execute(query.replace("?", "%s"), params)
            names = [c.name for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    with contextlib.closing(sqlite3.connect(url)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(query, params)]


def _traced_headers() -> tuple[dict[str, str], object]:
    """Start a client span; return the W3C headers that carry it, and the span."""
    span = CLIENT_TRACER.start_span("client call", kind=SpanKind.CLIENT)
    carrier: dict[str, str] = {}
    from opentelemetry import trace

    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(span))
    span.end()
    return carrier, span


def _server_span(sink: OtlpSink, request_id: str) -> dict:
    return sink.wait_for_spans(
        lambda s: (
            s["kind"] == "SERVER" and s["attributes"].get("paddle_meter.request_id") == request_id
        ),
        timeout=15,
    )[0]


def _call_pipeline_grpc(
    server, image: bytes, headers: dict[str, str]
) -> tuple[list[str], int, int]:
    request = pb.Request(key=["image"], value=[base64.b64encode(image).decode()], name="ocr")
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = pb_grpc.PipelineServiceStub(channel).inference(
            request, metadata=list(headers.items())
        )
    assert reply.err_no == 0, reply.err_msg
    texts = [item[0] for item in eval(reply.value[0])]  # noqa: S307 - the example client's own parse
    return texts, len(request.SerializeToString()), len(reply.SerializeToString())


def _call_pipeline_http(
    server, image: bytes, headers: dict[str, str]
) -> tuple[list[str], int, int]:
    body = json.dumps({"key": ["image"], "value": [base64.b64encode(image).decode()]}).encode()
    reply = httpx.post(
        f"{server.http_url}/ocr/prediction", content=body, headers=headers, timeout=60
    )
    assert reply.status_code == 200 and reply.json()["err_no"] == 0
    texts = [item[0] for item in eval(reply.json()["value"][0])]  # noqa: S307
    return texts, len(body), len(reply.content)


def _call_oip_grpc(server, image: bytes, headers: dict[str, str]) -> tuple[list[str], None, None]:
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    result = triton_grpc.InferenceServerClient(server.grpc_address).infer(
        "ocr", [tensor], headers=headers
    )
    return result.as_numpy("text")[0].decode().split("\n"), None, None


def _call_oip_http(server, image: bytes, headers: dict[str, str]) -> tuple[list[str], None, None]:
    tensor = triton_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    result = client.infer("ocr", [tensor], headers=headers)
    return result.as_numpy("text")[0].decode().split("\n"), None, None


CALLS = {
    "pipeline_grpc": _call_pipeline_grpc,
    "pipeline_http": _call_pipeline_http,
    "oip_grpc": _call_oip_grpc,
    "oip_http": _call_oip_http,
}


@pytest.mark.parametrize("surface", CALLS)
def test_trace_usage_sizes_and_ledger_per_call(stack, surface):
    server, sink, _, url = stack
    headers, client_span = _traced_headers()
    request_id = f"req-{surface}-{uuid.uuid4().hex[:8]}"
    headers.update({"x-request-id": request_id, "x-tenant": "legal"})
    texts, sent, received = CALLS[surface](server, CORPUS["document"].data, headers)
    characters = sum(len(t) for t in texts)

    span = _server_span(sink, request_id)
    ctx = client_span.get_span_context()
    assert span["trace_id"] == format_trace_id(ctx.trace_id)
    assert span["parent_span_id"] == format_span_id(ctx.span_id)
    attrs = span["attributes"]
    assert attrs["gen_ai.usage.output_tokens"] == characters
    assert attrs["paddle_meter.characters"] == characters
    assert attrs["paddle_meter.billable_tokens"] == characters
    assert attrs["paddle_meter.tenant"] == "legal"
    assert attrs["gen_ai.request.model"] == "ocr"
    assert attrs["gen_ai.operation.name"] == "ocr"
    if sent is not None:  # the surfaces whose exact wire bytes the test holds
        assert attrs["paddle_meter.request.size"] == sent
        assert attrs["paddle_meter.response.size"] == received
    stages = sink.wait_for_spans(
        lambda s: s["trace_id"] == span["trace_id"] and s["name"].startswith("ocr."),
        timeout=15,
        count=3,
    )
    assert {s["name"] for s in stages} >= {"ocr.det", "ocr.cls", "ocr.rec"}
    assert all(s["parent_span_id"] == span["span_id"] for s in stages)

    (row,) = _ledger_rows(url, "WHERE request_id = ?", (request_id,))
    assert row["status"] == "ok" and row["tenant"] == "legal" and row["model"] == "ocr"
    assert row["output_tokens"] == characters and row["billable_tokens"] == characters
    assert row["images"] == 1 and row["trace_id"] == span["trace_id"]
    if sent is not None:
        assert row["request_bytes"] == sent and row["response_bytes"] == received
    assert row["content"] is None and len(row["content_sha256"]) == 64


def test_usage_goes_back_to_the_caller(stack):
    server, *_ = stack
    reply = httpx.post(
        f"{server.http_url}/ocr/prediction",
        json={
            "key": ["image"],
            "value": [base64.b64encode(CORPUS["english_invoice"].data).decode()],
        },
        headers={"x-request-id": "usage-back-1"},
    )
    texts = [item[0] for item in eval(reply.json()["value"][0])]  # noqa: S307
    assert reply.headers["x-request-id"] == "usage-back-1"
    assert int(reply.headers["x-usage-output-tokens"]) == sum(map(len, texts))
    assert reply.headers["x-usage-input-tokens"] == "0"
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.PipelineServiceStub(channel)
        request = pb.Request(
            key=["image"], value=[base64.b64encode(CORPUS["cjk_invoice"].data).decode()], logid=9090
        )
        response, call = stub.inference.with_call(request)
    trailing = dict(call.trailing_metadata())
    assert trailing["x-request-id"] == "9090"
    assert int(trailing["x-usage-output-tokens"]) == sum(len(i[0]) for i in eval(response.value[0]))  # noqa: S307


def test_bad_request_gets_error_span_and_zero_billable_record(stack):
    server, sink, _, url = stack
    request_id = f"bad-{uuid.uuid4().hex[:8]}"
    reply = httpx.post(
        f"{server.http_url}/v2/models/ocr/infer",
        json={
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}
            ]
        },
        headers={"x-request-id": request_id},
    )
    assert reply.status_code == 400
    span = _server_span(sink, request_id)
    assert span["status_code"] == "ERROR" and span["status_message"]
    assert span["attributes"]["paddle_meter.billable_tokens"] == 0
    (row,) = _ledger_rows(url, "WHERE request_id = ?", (request_id,))
    assert (
        row["status"] != "ok" and row["billable_tokens"] == 0 and row["cost"] in ("0", "0.000000")
    )
    grpc_id = f"badgrpc-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = pb_grpc.PipelineServiceStub(channel).inference(
            pb.Request(key=["image"], value=["bm90IGFuIGltYWdl"]),
            metadata=[("x-request-id", grpc_id)],
        )
    assert reply.err_no == 5000
    mismatched = f"badhttp-{uuid.uuid4().hex[:8]}"
    reply = httpx.post(
        f"{server.http_url}/ocr/prediction",
        json={"key": ["image"], "value": []},
        headers={"x-request-id": mismatched},
    )
    assert reply.status_code == 200 and reply.json()["err_no"] == 5000
    (row,) = _ledger_rows(url, "WHERE request_id = ?", (mismatched,))
    assert row["status"] == "err_no=5000" and row["billable_tokens"] == 0
    span = _server_span(sink, grpc_id)
    assert span["status_code"] == "ERROR"
    (row,) = _ledger_rows(url, "WHERE request_id = ?", (grpc_id,))
    assert row["status"] == "err_no=5000" and row["billable_tokens"] == 0


def test_retried_request_id_is_served_each_time_but_billed_once(stack):
    server, _, _, url = stack
    request_id = f"retry-{uuid.uuid4().hex[:8]}"
    body = {"key": ["image"], "value": [base64.b64encode(CORPUS["cjk_invoice"].data).decode()]}
    told = []
    for _ in range(3):
        reply = httpx.post(
            f"{server.http_url}/ocr/prediction", json=body, headers={"x-request-id": request_id}
        )
        assert reply.status_code == 200 and reply.json()["err_no"] == 0
        told.append((reply.headers.get("x-usage-replay"), reply.headers["x-usage-output-tokens"]))
    (row,) = _ledger_rows(url, "WHERE request_id = ?", (request_id,))
    # The retries are replays: marked, and told the billed record's counts.
    assert told == [(None, str(row["output_tokens"]))] + [("true", str(row["output_tokens"]))] * 2


def test_ledger_health_is_on_metrics(stack):
    server, *_ = stack
    _call_pipeline_http(server, CORPUS["cjk_invoice"].data, {})  # at least one commit
    scrape = httpx.get(f"{server.http_url}/metrics").text
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("paddle_meter_ledger_")
    }
    assert values["paddle_meter_ledger_spool_pending"] == 0
    assert values["paddle_meter_ledger_write_failures_total"] == 0
    commits = values["paddle_meter_ledger_commit_duration_seconds_count"]
    assert commits >= 1
    # Every commit falls in some bucket: the +Inf bucket holds them all.
    inf_bucket = next(
        float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("paddle_meter_ledger_commit_duration_seconds_bucket")
        and 'le="+Inf"' in line
    )
    assert inf_bucket == commits


def test_concurrent_requests_give_exact_records_and_metric_sums(stack):
    server, sink, _, url = stack
    tenant = f"dept-{uuid.uuid4().hex[:6]}"
    images = [render_line(f"报销单 {i:03d} 金额 {i * 3}.00 元") for i in range(12)]
    calls = list(CALLS.values())
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [
            pool.submit(calls[i % 4], server, image, {"x-tenant": tenant})
            for i, image in enumerate(images)
        ]
        characters = sum(sum(len(t) for t in f.result(timeout=300)[0]) for f in futures)
    rows = _ledger_rows(url, "WHERE tenant = ?", (tenant,))
    assert len(rows) == len(images)
    assert sum(r["output_tokens"] for r in rows) == characters
    attrs = {"paddle_meter.tenant": tenant}
    sink.wait_for_metric_sum("paddle_meter.tokens", characters, timeout=20, **attrs)
    sink.wait_for_metric_sum("paddle_meter.requests", len(images), timeout=20, **attrs)
    scrape = httpx.get(f"{server.http_url}/metrics").text
    tokens = sum(
        float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("paddle_meter_tokens_total{")
        and f'paddle_meter_tenant="{tenant}"' in line
    )
    assert tokens == characters


def test_collector_down_costs_requests_nothing(stack):
    server, sink, collector, url = stack
    collector.stop()
    try:
        ids = [f"down-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
        for request_id in ids:
            texts, *_ = _call_pipeline_http(
                server, CORPUS["cjk_invoice"].data, {"x-request-id": request_id}
            )
            assert texts
        for request_id in ids:  # the ledger, not telemetry, is the bill: nothing lost
            assert len(_ledger_rows(url, "WHERE request_id = ?", (request_id,))) == 1
    finally:
        collector.start()
    request_id = f"back-{uuid.uuid4().hex[:6]}"
    _call_pipeline_http(server, CORPUS["cjk_invoice"].data, {"x-request-id": request_id})
    assert _server_span(sink, request_id)["attributes"]["paddle_meter.request_id"] == request_id


def test_pdf_over_paddlex_ocr_pages_agree_in_span_metrics_and_ledger(stack):
    """A two-page PDF over PaddleX's /ocr: the span, the pages metric and the ledger row
    (SQLite and PostgreSQL, schema v8) carry the same pages and characters."""
    from imaging import DOCUMENT_LINES, JUDGEMENT_LINES, render_pdf

    server, sink, _, url = stack
    request_id = f"pdf-{uuid.uuid4().hex[:8]}"
    pdf = render_pdf([JUDGEMENT_LINES, DOCUMENT_LINES])
    reply = httpx.post(f"{server.http_url}/ocr",
                       json={"file": base64.b64encode(pdf).decode(), "visualize": False},
                       headers={"x-request-id": request_id, "x-tenant": "pdfs"}, timeout=120)
    body = reply.json()
    assert reply.status_code == 200 and body["logId"] == request_id, body
    pages = body["result"]["ocrResults"]
    characters = sum(len(t) for page in pages for t in page["prunedResult"]["rec_texts"])
    assert len(pages) == 2 and characters > 0
    attrs = _server_span(sink, request_id)["attributes"]
    assert attrs["paddle_meter.pages"] == 2 and attrs["paddle_meter.images"] == 1
    assert attrs["paddle_meter.characters"] == characters
    (row,) = _ledger_rows(url, "WHERE request_id = ?", (request_id,))
    assert (row["status"], row["pages"], row["images"], row["characters"]) == (
        "ok", 2, 1, characters)
    sink.wait_for_metric_sum("paddle_meter.pages", 2, timeout=20,
                             **{"paddle_meter.tenant": "pdfs"})


def test_ocr_refuses_urls_without_an_allow_list(stack):
    """The embedded default lists no hosts: a `file` URL is refused, saying why and how."""
    server, _, _, url = stack
    request_id = f"url-{uuid.uuid4().hex[:8]}"
    reply = httpx.post(f"{server.http_url}/ocr",
                       json={"file": "http://127.0.0.1:1/judgement.pdf", "fileType": 0},
                       headers={"x-request-id": request_id}, timeout=60)
    body = reply.json()
    assert reply.status_code == 400 and body["errorCode"] == 400 and body["logId"] == request_id
    assert "paddle-meter does not fetch URLs" in body["errorMsg"]
    assert "server.ocr_url_hosts" in body["errorMsg"]
    (row,) = _ledger_rows(url, "WHERE request_id = ?", (request_id,))
    assert row["status"] == "400" and row["billable_tokens"] == 0 and row["pages"] == 0
