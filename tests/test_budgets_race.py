"""The budget race, on the real server with ``--workers 2`` and one PostgreSQL ledger.

64 concurrent calls (64 client threads, real HTTP on loopback, spread over both workers by
the kernel's SO_REUSEPORT) against a budget that allows about 20 of them:

- ERNIE knows its exact tokens before inference, so the billed tokens never exceed the
  limit: exactly 20 calls are served, the other 44 get 429 with the budget message and
  ``Retry-After``, and are not in the ledger;
- OCR reserves a configured per-image estimate (here 2 characters, well under what each
  image really holds), so the budget can be overshot, but only within the bound
  docs/design.md states: concurrency x (actual - estimate).

Afterwards ``budgets show`` says used == the ledger's sum and nothing is still reserved.
The demo ERNIE is untrained (no weights are reachable here): only its token counts matter.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from imaging import render_line
from support.ernie_demo import ernie_model, make_demo_ernie
from support.pg import temporary_database
from support.server import ServerProcess

CONCURRENCY = 64
ERNIE_TEXT = "发票金额 1,234.56 元 invoice total"
OCR_ESTIMATE = 2  # characters reserved per image, far below what each image holds
PM = str(Path(sys.executable).with_name("paddle-meter"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("budget-race")
    demo = make_demo_ernie(workdir / "ernie-demo")
    with temporary_database("pm_race") as url:
        config = {
            "models": {
                "ocr": {"kind": "ocr"},
                "ernie": ernie_model(demo),
            },
            "server": {"max_queued_inferences": 256, "max_concurrent_http": 256},
            "ledger": {"url": url},
            "billing": {"timezone": "Asia/Shanghai"},
            "budgets": {"ocr_estimate_chars_per_image": OCR_ESTIMATE, "refresh_s": 1},
        }
        with ServerProcess(workdir, config, workers=2) as server:
            yield server, url, workdir


def _cli(workdir: Path, url: str, *args: str) -> str:
    done = subprocess.run([PM, *args, "--ledger", url], capture_output=True, text=True,
                          timeout=60, cwd=workdir,
                          env={**os.environ, "PADDLE_METER_CONFIG": str(workdir / "config.yaml")})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _set_budget(server, workdir, url, *args: str) -> None:
    _cli(workdir, url, "budgets", "set", *args)
    # Each worker re-reads the budget table every refresh_s (1 s here): wait for both.
    time.sleep(2.5)


def _ernie_call(server, tenant: str) -> httpx.Response:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                        "data": [ERNIE_TEXT]}]}
    return httpx.post(f"{server.http_url}/v2/models/ernie/infer", json=body, timeout=120,
                      headers={"x-tenant": tenant, "x-request-id": uuid.uuid4().hex})


def _ocr_call(server, tenant: str, image: bytes) -> httpx.Response:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(image).decode()]}]}
    return httpx.post(f"{server.http_url}/v2/models/ocr/infer", json=body, timeout=120,
                      headers={"x-tenant": tenant, "x-request-id": uuid.uuid4().hex})


def _race(call, n: int) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: call(i), range(n)))


def _ledger(url: str, tenant: str) -> tuple[int, int, int, int]:
    """(ok rows, all rows, billable tokens, characters) of ``tenant``."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FILTER (WHERE status = 'ok'), COUNT(*), "
            "COALESCE(SUM(billable_tokens) FILTER (WHERE status = 'ok'), 0), "
            "COALESCE(SUM(characters) FILTER (WHERE status = 'ok'), 0) "
            "FROM usage_records WHERE tenant = %s", (tenant,)).fetchone()
    return tuple(int(v) for v in row)


def _show(workdir, url, tenant: str) -> dict:
    rows = json.loads(_cli(workdir, url, "budgets", "show", "--tenant", tenant, "--json"))
    assert len(rows) == 1
    return rows[0]


def test_ernie_race_never_bills_past_the_limit(stack):
    server, url, workdir = stack
    probe = httpx.post(f"{server.http_url}/v1/tokenize", json={"model": "ernie",
                                                                "text": ERNIE_TEXT}, timeout=30)
    tokens = probe.json()["count"]
    limit = 20 * tokens
    _set_budget(server, workdir, url, "--tenant", "race-ernie", "--period", "month",
                "--limit-tokens", str(limit))
    answers = _race(lambda i: _ernie_call(server, "race-ernie"), CONCURRENCY)
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) == 20 and codes.count(429) == CONCURRENCY - 20, codes
    refused = [a for a in answers if a.status_code == 429]
    for answer in refused:
        message = answer.json()["error"]
        assert message.startswith("tenant race-ernie has used "), message
        assert f"of {limit:,} billable tokens this month" in message
        assert "resets " in message and " Asia/Shanghai" in message
        assert int(answer.headers["retry-after"]) >= 1
    ok_rows, all_rows, billed, _ = _ledger(url, "race-ernie")
    assert (ok_rows, all_rows) == (20, 20)  # refused calls are never in the ledger
    assert billed == limit
    shown = _show(workdir, url, "race-ernie")
    assert (shown["used"], shown["reserved"], shown["remaining"]) == (billed, 0, 0)
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    assert 'paddle_meter_limit_refusals_total{' in metrics
    assert 'paddle_meter_limit_refusal="budget_exceeded"' in metrics


def test_ocr_race_overshoots_only_within_the_stated_bound(stack):
    server, url, workdir = stack
    limit = 60
    _set_budget(server, workdir, url, "--tenant", "race-ocr", "--period", "day",
                "--limit-characters", str(limit))
    images = [render_line(f"PAY {i:03d} OK", size=28) for i in range(CONCURRENCY)]
    answers = _race(lambda i: _ocr_call(server, "race-ocr", images[i]), CONCURRENCY)
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(served) + len(refused) == CONCURRENCY, sorted(a.status_code for a in answers)
    assert refused and served
    assert "characters today" in refused[0].json()["error"]
    actual = [int(a.headers["x-usage-output-tokens"]) for a in served]
    ok_rows, _, _, characters = _ledger(url, "race-ocr")
    assert ok_rows == len(served) and characters == sum(actual)
    # docs/design.md: overshoot <= calls in flight x (actual - estimate).
    bound = CONCURRENCY * max(0, max(actual) - OCR_ESTIMATE)
    assert characters <= limit + bound
    shown = _show(workdir, url, "race-ocr")
    assert (shown["used"], shown["reserved"]) == (characters, 0)
