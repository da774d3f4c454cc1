"""A real Prometheus (Debian 2.42) scrapes the real server (``--workers 2``) while traffic runs;
every panel query of the shipped Grafana dashboard and the alerts are then evaluated
through Prometheus's HTTP API.

- The dashboard (deploy/grafana/dashboards/paddle-meter.json): every target's expression,
  with Grafana's variables filled in, must return data (a panel whose query returns nothing
  fails the test; NaN-only answers count as nothing).
- The rules (deploy/prometheus/paddle-meter-rules.yml) load and evaluate without error. The
  history a surge is measured against ("the same hour yesterday", "the trailing day") is
  backfilled with ``promtool tsdb create-blocks-from openmetrics``: tenant finance used 0.1
  tokens/s yesterday; today it sends 100 over-long texts (64 tokens each, truncated), so both
  surge alerts go pending, the over-long flood alert fires, a spent budget fires its soft and
  hard alerts, a tenant whose calls fail makes the error-burst alert pending, and while the
  test holds the SQLite ledger's write lock, calls are still served with their records
  spooled and the spool-backlog alert goes pending. Ledger write failures (database AND
  spool refusing) and metering errors need faults this test does not inject: their firing
  is unit tested in tests/test_prometheus_rules.py.

The demo ERNIE is untrained (no weights are reachable here): only its token counts matter.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from imaging import render_line
from support.ernie_demo import ernie_model, make_demo_ernie
from support.server import ServerProcess, free_port
from test_serving_workers import _listening_pids, _wait_until

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "paddle-meter.json"
RULES = REPO / "deploy" / "prometheus" / "paddle-meter-rules.yml"
LONG = "长文本 " * 200  # truncated to max_seq_len 64
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$tenant": ".*"}


def _backfill(tsdb: Path, work: Path) -> None:
    """Yesterday's baseline of tenant finance: 0.1 tokens/s, from 26 h to 3 h ago."""
    now = int(time.time())
    lines = []
    for name in ("tenant:paddle_meter_tokens:rate1h", "tenant:paddle_meter_tokens:rate5m"):
        lines.append(f"# TYPE {name.replace(':', '_')} gauge")  # informational only
        lines.extend(f'{name}{{paddle_meter_tenant="finance"}} 0.1 {ts}'
                     for ts in range(now - 26 * 3600, now - 3 * 3600, 60))
    history = work / "history.om"
    history.write_text("\n".join(line for line in lines if not line.startswith("#"))
                       + "\n# EOF\n", encoding="utf-8")
    done = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics",
                           str(history), str(tsdb)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    assert shutil.which("prometheus"), "prometheus missing: `make test` installs Debian's"
    work = tmp_path_factory.mktemp("prom-stack")
    demo = make_demo_ernie(work / "ernie-demo")
    config = {
        "models": {"ocr": {"kind": "ocr"}, "ernie": ernie_model(demo)},
        # A short busy timeout: while the test holds the database's write lock, records
        # go to the spool at once (the spool-backlog alert's scenario).
        "ledger": {"url": str(work / "ledger.sqlite3"), "busy_timeout_ms": 200},
        "budgets": {"refresh_s": 1, "limits": [
            {"tenant": "spent", "period": "day", "limit_requests": 3, "soft": 0.5}]},
    }
    with ServerProcess(work / "server", config, workers=2) as server:
        _wait_until(lambda: len(_listening_pids(server.http_port)) == 2,
                    "both workers to listen", 180)
        tsdb = work / "tsdb"
        tsdb.mkdir()
        _backfill(tsdb, work)
        port = free_port()
        (work / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "paddle-meter",
                                "static_configs": [{"targets": [f"127.0.0.1:{server.http_port}"]}]}],
        }), encoding="utf-8")
        log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed below
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={tsdb}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until(lambda: _ready(url), "prometheus to be ready", 60)
            _traffic(server)
            spooling = _spool_while_locked(server, url, work / "ledger.sqlite3")
            time.sleep(6)  # a few scrapes and rule evaluations after the traffic
            yield url, server, spooling
        finally:
            prom.terminate()
            prom.wait(30)
            log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _traffic(server) -> None:
    def ernie(tenant: str, text: str) -> int:
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
        return httpx.post(f"{server.http_url}/v2/models/ernie/infer", json=body, timeout=60,
                          headers={"x-tenant": tenant, "x-request-id": uuid.uuid4().hex}
                          ).status_code

    def ocr(tenant: str, image: bytes) -> int:
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(image).decode()]}]}
        return httpx.post(f"{server.http_url}/v2/models/ocr/infer", json=body, timeout=60,
                          headers={"x-tenant": tenant, "x-request-id": uuid.uuid4().hex}
                          ).status_code

    # A counter's increase counts from its first scraped value, and each worker has its own
    # series: create finance's on both workers first, let Prometheus scrape them, then surge.
    _prime(server, "paddle_meter_truncated_inputs_total", "finance",
           lambda: ernie("finance", LONG) == 200)
    _prime(server, "paddle_meter_requests_total", "broken",
           lambda: ocr("broken", b"not an image") == 400)
    time.sleep(3)
    assert [ernie("finance", LONG) for _ in range(100)] == [200] * 100
    for i in range(3):  # apart, for the same reason
        assert ocr("finance", render_line(f"INVOICE {i} TOTAL 12.50")) == 200
        time.sleep(1.5)
    assert [ernie("spent", "付款") for _ in range(4)] == [200, 200, 200, 429]
    assert set(ocr("broken", b"not an image") for _ in range(40)) == {400}
    assert ernie("broken", "ok") == 200


def _prime(server, family: str, tenant: str, call) -> None:
    """Call until ``family`` has a series of ``tenant`` on both workers."""
    for _ in range(40):
        assert call()
        if _on_both_workers(server, family, tenant):
            return
        time.sleep(0.3)
    raise AssertionError(f"{family} of {tenant} never reached both workers")


def _on_both_workers(server, family: str, tenant: str) -> bool:
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    workers = {line.split('worker="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith(family + "{") and f'paddle_meter_tenant="{tenant}"' in line}
    return workers == {"0", "1"}


def _spool_while_locked(server, url: str, ledger: Path) -> set[str]:
    """Hold the ledger's write lock while calls are served (their records are spooled);
    returns the alert states of the spool-backlog alert seen meanwhile."""
    lock = sqlite3.connect(ledger, timeout=5, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    states: set[str] = set()
    try:
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                            "data": ["账单 spooled"]}]}
        for _ in range(3):
            reply = httpx.post(f"{server.http_url}/v2/models/ernie/infer", json=body, timeout=60,
                               headers={"x-tenant": "finance"})
            assert reply.status_code == 200  # served: the record is durable in the spool
        deadline = time.monotonic() + 20
        while not states and time.monotonic() < deadline:
            states = {a["metric"]["alertstate"] for a in _query(
                url, 'ALERTS{alertname="PaddleMeterLedgerSpoolBacklog"}')}
            time.sleep(0.5)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    return states


def _query(url: str, expr: str) -> list[dict]:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def _has_data(result: list[dict]) -> bool:
    return any(not math.isnan(float(r["value"][1])) for r in result)


def test_every_dashboard_panel_returns_data(stack):
    url, _, _ = stack
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    empty = []
    queried = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queried += 1
            if not _has_data(_query(url, expr)):
                empty.append(f"{panel['title']}: {expr}")
    assert queried >= len(dashboard["panels"]) >= 15
    assert empty == [], "panels without data:\n" + "\n".join(empty)


def test_rules_evaluate_and_the_scenario_raises_its_alerts(stack):
    url, _, spooling = stack
    assert spooling == {"pending"}  # records spooled while the database refused writes
    groups = httpx.get(f"{url}/api/v1/rules", timeout=30).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 13
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    deadline = time.monotonic() + 30
    want = {
        ("PaddleMeterTokenSurgeVsYesterday", "finance"),
        ("PaddleMeterTokenSurgeVsTrailingDay", "finance"),
        ("PaddleMeterOverlongInputFlood", "finance"),
        ("PaddleMeterBudgetSoftLimit", "spent"),
        ("PaddleMeterBudgetExhausted", "spent"),
        ("PaddleMeterErrorRateBurst", "broken"),
    }
    while True:
        active = {(a["metric"]["alertname"], a["metric"].get("paddle_meter_tenant"))
                  for a in _query(url, 'ALERTS{alertstate=~"pending|firing"}')}
        if want <= active or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert want <= active, f"missing: {want - active}; active: {active}"
    # Tenants that did nothing unusual raise nothing.
    assert not {a for a in active if a[1] in ("spent",) and "Surge" in a[0]}
    # Every alert's measured quantity (its expression's left operand) returns data, so no
    # alert watches a metric name that does not exist. Metering errors are the exception:
    # their counter has no series until metering fails, which no outside input can cause.
    quiet = []
    for rule in rules:
        if rule["type"] != "alerting" or rule["name"] == "PaddleMeterMeteringErrors":
            continue
        measured = re.split(r"\s(?:>=|>)\s", rule["query"], maxsplit=1)[0]
        if not _query(url, measured):
            quiet.append(f"{rule['name']}: {measured}")
    assert quiet == []
    firing = {(a["metric"]["alertname"], a["metric"].get("paddle_meter_tenant"))
              for a in _query(url, 'ALERTS{alertstate="firing"}')}
    assert ("PaddleMeterOverlongInputFlood", "finance") in firing  # no `for`: fires at once
