"""GET /v1/usage over a real uvicorn server on loopback port 0; non-loopback gets 403."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from billing.pricing import PriceBook
from billing.usage_api import is_loopback, make_usage_router
from exporters.ledger import LedgerReader, open_ledger
from exporters.usage_record import UsageRecord

FIX = Path(__file__).parent / "fixtures" / "billing"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "ledger.db")
    book = PriceBook.load(str(FIX / "pricing.yaml"))
    recs = []
    for line in (FIX / "records.jsonl").read_text().splitlines():
        rec = UsageRecord(**json.loads(line))
        rec.price_id, rec.cost = book.price(rec)
        recs.append(rec)
    # April: request id r1 again, by acme (already billed in March: not a new record), by
    # beta (its own id space: billed) and by beta for a failed attempt (its own row)
    for tenant, status, span in (("acme", "ok", "a1"), ("beta", "ok", "b1"),
                                 ("beta", "UNAVAILABLE", "b2")):
        rec = UsageRecord(**{**json.loads((FIX / "records.jsonl").read_text().splitlines()[0]),
                             "ts": "2026-04-01T08:00:00+00:00", "tenant": tenant,
                             "status": status, "span_id": span})
        rec.price_id, rec.cost = book.price(rec)
        recs.append(rec)
    sink = open_ledger(path)
    assert [o.inserted for o in sink.write_batch(recs)[-3:]] == [False, True, True]
    sink.shutdown()
    reader = LedgerReader(path)
    app = FastAPI()
    app.include_router(make_usage_router(lambda: reader))
    return app


@pytest.fixture(scope="module")
def base_url(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_usage_report_json(base_url):
    r = httpx.get(f"{base_url}/v1/usage", params={
        "from": "2026-03-01", "to": "2026-03-31", "by": "tenant", "period": "month"})
    assert r.status_code == 200
    body = r.json()
    assert body["by"] == ["tenant"]
    assert [(x["tenant"], x["requests"], x["cost"]) for x in body["rows"]] == [
        ("acme", 5, "0.05"), ("beta", 3, "0.10")]
    r = httpx.get(f"{base_url}/v1/usage", params={"from": "2026-03-01", "to": "2026-03-31",
                                                  "tenant": "beta", "by": "model"})
    assert [(x["period"], x["requests"]) for x in r.json()["rows"]] == [
        ("2026-03-01", 1), ("2026-03-02", 2)]


def test_usage_is_per_tenant_with_every_attempt_counted(base_url):
    r = httpx.get(f"{base_url}/v1/usage", params={
        "from": "2026-04-01", "to": "2026-04-30", "by": "tenant", "period": "month"})
    assert r.status_code == 200
    assert [(x["tenant"], x["requests"], x["errors"]) for x in r.json()["rows"]] == [
        ("beta", 2, 1)]


def test_bad_query_is_400(base_url):
    r = httpx.get(f"{base_url}/v1/usage", params={"from": "soon", "to": "2026-03-31"})
    assert r.status_code == 400 and "bad date" in r.json()["detail"]
    assert httpx.get(f"{base_url}/v1/usage").status_code == 422


async def test_non_loopback_client_is_refused(app):
    # The real ASGI app, called with a client address from another host.
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
        r = await client.get("/v1/usage", params={"from": "2026-03-01", "to": "2026-03-31"})
    assert r.status_code == 403
    assert is_loopback("::1") and is_loopback("127.0.0.2") and not is_loopback("testclient")
