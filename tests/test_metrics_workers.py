"""``GET /metrics`` with ``--workers 2``: every scrape holds both workers' series.

The real server with two worker processes (SO_REUSEPORT) and the demo ERNIE (untrained: only
its token counts matter). Calls on fresh connections land on both workers; then every
scrape, whichever worker answers it, carries one series per worker (label ``worker``), and
the counters summed over workers equal the ledger's sums, scrape after scrape.
"""

from __future__ import annotations

import sqlite3
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.ernie_demo import ernie_model, make_demo_ernie
from support.server import ServerProcess
from test_serving_workers import _listening_pids, _wait_until

CALLS = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("metrics-workers")
    demo = make_demo_ernie(workdir / "ernie-demo")
    config = {"models": {"ernie": ernie_model(demo)},
              "ledger": {"url": str(workdir / "ledger.sqlite3")}}
    with ServerProcess(workdir, config, workers=2) as server:
        _wait_until(lambda: len(_listening_pids(server.http_port)) == 2,
                    "both workers to listen", 180)
        yield server, workdir / "ledger.sqlite3"


def _scrape(url: str) -> dict[str, dict[str, float]]:
    """{family: {worker: summed value}} for the counters the test checks."""
    text = httpx.get(f"{url}/metrics", timeout=10).text  # a new connection: any worker
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("paddle_meter_tokens", "paddle_meter_requests"):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            if family.name == "paddle_meter_tokens" and \
                    sample.labels.get("gen_ai_token_type") != "input":
                continue
            per = out.setdefault(family.name, {})
            worker = sample.labels["worker"]
            per[worker] = per.get(worker, 0.0) + sample.value
    return out


def test_every_scrape_sums_to_the_ledger(server):
    server, ledger = server
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                        "data": ["对账单 statement 2026"]}]}
    for _ in range(CALLS):  # httpx.post: a new connection each, spread by the kernel
        reply = httpx.post(f"{server.http_url}/v2/models/ernie/infer", json=body, timeout=30,
                           headers={"x-request-id": uuid.uuid4().hex})
        assert reply.status_code == 200
    with sqlite3.connect(ledger) as conn:
        rows, tokens = conn.execute(
            "SELECT COUNT(*), SUM(input_tokens) FROM usage_records").fetchone()
    assert rows == CALLS
    time.sleep(2.5)  # each worker snapshots its series every second
    for _ in range(12):
        seen = _scrape(server.http_url)
        assert set(seen["paddle_meter_tokens"]) == {"0", "1"}, seen
        assert all(v > 0 for v in seen["paddle_meter_tokens"].values()), seen  # both served
        assert sum(seen["paddle_meter_tokens"].values()) == tokens
        assert sum(seen["paddle_meter_requests"].values()) == rows
