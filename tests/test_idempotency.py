"""Idempotency per (tenant, request id), end to end: the real server, a real SQLite ledger,
real clients on all four surfaces (tritonclient for OIP gRPC / HTTP, the pipeline's own
protocol over gRPC and HTTP).

- the same id with the same image is billed once; the retry is served, marked
  ``x-usage-replay: true`` and told the original token counts;
- the same id with another image is refused (ALREADY_EXISTS / 409 / pipeline err_no 5000)
  with a message naming the id, and writes nothing;
- two tenants may use the same id: two records;
- replays are bounded (``metering.max_replays``, default 10): the 11th is refused;
- telemetry agrees with the ledger: the tokens ``/metrics`` counts per tenant equal the
  ledger's billed tokens, replays and refusals included.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
import uuid

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from imaging import render_line
from support.metered_calls import SURFACES, Endpoint, Outcome, SurfaceClient
from support.server import ServerProcess
from tritonclient.utils import InferenceServerException

MAX_REPLAYS = 10  # the default of metering.max_replays


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, ledger path, a SurfaceClient on it)."""
    workdir = tmp_path_factory.mktemp("idempotency")
    url = str(workdir / "ledger.sqlite3")
    with ServerProcess(workdir, {"ledger": {"url": url}}) as server, SurfaceClient(
        Endpoint(server.http_url, server.grpc_address), timeout_s=120
    ) as client:
        yield server, url, client


def _image(label: str) -> bytes:
    return render_line(f"IDEM {label}")


def _rows(url: str, tenant: str, request_id: str | None = None) -> list[dict]:
    """Every ledger row of ``tenant`` (and ``request_id``), billed or not."""
    query, params = "SELECT * FROM usage_records WHERE tenant = ?", [tenant]
    if request_id is not None:
        query, params = query + " AND request_id = ?", [*params, request_id]
    with contextlib.closing(sqlite3.connect(url, timeout=30)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(query, params)]


def _assert_telemetry_agrees(server, url: str, tenant: str) -> None:
    """The token counter /metrics shows for ``tenant`` is the ledger's billed sum."""
    scrape = httpx.get(f"{server.http_url}/metrics", timeout=30).text
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("paddle_meter_tokens_total{")
        and f'paddle_meter_tenant="{tenant}"' in line
    )
    billed = sum(r["billable_tokens"] for r in _rows(url, tenant) if r["status"] == "ok")
    assert billed > 0 and counted == billed


def _triton_infer(server, surface: str, image: bytes, headers: dict[str, str]) -> None:
    """One OIP call through the official tritonclient; raises InferenceServerException."""
    module = triton_grpc if surface == "oip_grpc" else triton_http
    address = server.grpc_address if surface == "oip_grpc" else f"127.0.0.1:{server.http_port}"
    tensor = module.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    client = module.InferenceServerClient(address)
    try:
        client.infer("ocr", [tensor], headers=headers)
    finally:
        client.close()


def _key(surface: str, what: str) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"t-{what}-{tag}", f"rid-{surface}-{what}-{tag}"


@pytest.mark.parametrize("surface", SURFACES)
def test_same_id_same_image_is_billed_once_and_replayed(served, surface) -> None:
    server, url, client = served
    tenant, request_id = _key(surface, "same")
    image = _image(f"SAME {surface}")
    first = client.call(surface, request_id, image, tenant=tenant)
    assert first.ok and not first.replay and first.output_tokens > 0, first
    again = client.call(surface, request_id, image, tenant=tenant)
    assert again.ok and again.replay, again
    assert (again.input_tokens, again.output_tokens) == (first.input_tokens, first.output_tokens)
    if surface.startswith("oip_"):  # a Triton client's retry is a replay too: served
        _triton_infer(server, surface, image, {"x-request-id": request_id, "x-tenant": tenant})
    (row,) = _rows(url, tenant, request_id)
    assert row["status"] == "ok" and row["output_tokens"] == first.output_tokens
    _assert_telemetry_agrees(server, url, tenant)


def _refused_for_other_image(server, client, surface, request_id, tenant) -> str:
    """Send another image under a billed id; returns the refusal's message."""
    other = _image(f"OTHER {surface}")
    headers = {"x-request-id": request_id, "x-tenant": tenant}
    if surface.startswith("oip_"):
        with pytest.raises(InferenceServerException) as refused:
            _triton_infer(server, surface, other, headers)
        expected = "StatusCode.ALREADY_EXISTS" if surface == "oip_grpc" else "409"
        assert refused.value.status() == expected
        return refused.value.message()
    outcome: Outcome = client.call(surface, request_id, other, tenant=tenant)
    assert outcome.status == "err_no 5000" and not outcome.retryable, outcome
    if surface == "pipeline_http":  # nothing of the model's result in the answer
        reply = httpx.post(
            f"{server.http_url}/ocr/prediction",
            json={"key": ["image"], "value": [base64.b64encode(other).decode()]},
            headers=headers,
            timeout=120,
        ).json()
        assert reply["err_no"] == 5000 and not reply.get("value")
    return outcome.message


@pytest.mark.parametrize("surface", SURFACES)
def test_same_id_other_image_is_refused_and_writes_nothing(served, surface) -> None:
    server, url, client = served
    tenant, request_id = _key(surface, "other")
    first = client.call(surface, request_id, _image(f"FIRST {surface}"), tenant=tenant)
    assert first.ok, first
    message = _refused_for_other_image(server, client, surface, request_id, tenant)
    assert f"x-request-id '{request_id}' was already used by tenant '{tenant}'" in message
    assert "send a new x-request-id" in message
    (row,) = _rows(url, tenant, request_id)  # the billed record only, untouched
    assert row["status"] == "ok" and row["output_tokens"] == first.output_tokens
    _assert_telemetry_agrees(server, url, tenant)


def test_two_tenants_may_use_the_same_id(served) -> None:
    server, url, client = served
    request_id = f"shared-{uuid.uuid4().hex[:8]}"
    image = _image("SHARED")
    tenants = [f"ta-{uuid.uuid4().hex[:6]}", f"tb-{uuid.uuid4().hex[:6]}"]
    for tenant in tenants:
        outcome = client.call("pipeline_grpc", request_id, image, tenant=tenant)
        assert outcome.ok and not outcome.replay, outcome
    for tenant in tenants:
        (row,) = _rows(url, tenant, request_id)
        assert row["status"] == "ok"
        _assert_telemetry_agrees(server, url, tenant)


def test_replays_are_bounded(served) -> None:
    server, url, client = served
    tenant, request_id = _key("oip_http", "bounded")
    image = _image("BOUNDED")
    outcomes = [client.call("oip_http", request_id, image, tenant=tenant)
                for _ in range(1 + MAX_REPLAYS)]
    assert all(o.ok for o in outcomes), outcomes
    assert [o.replay for o in outcomes] == [False] + [True] * MAX_REPLAYS
    late = client.call("oip_http", request_id, image, tenant=tenant)
    assert late.status == "http 409" and not late.retryable, late
    assert f"already replayed {MAX_REPLAYS} times (metering.max_replays)" in late.message
    late_pipeline = client.call("pipeline_http", request_id, image, tenant=tenant)
    assert late_pipeline.status == "err_no 5000", late_pipeline
    (row,) = _rows(url, tenant, request_id)
    assert row["status"] == "ok"
    _assert_telemetry_agrees(server, url, tenant)
