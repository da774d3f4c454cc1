"""The built-in anomaly detector on the real server (``--workers 2``, demo ERNIE, untrained:
only its token counts matter) with real webhook receivers on loopback.

A token surge (tenant ``surge``: many short texts) and a flood of over-long inputs (tenant
``flood``: texts truncated to max_seq_len) each produce exactly one anomaly, whatever both
workers evaluate every second (the cooldown is checked and claimed in one transaction in
the ledger database); each is delivered once to a receiver of every format (generic, Slack,
DingTalk, WeCom) and logged once as a structured event; a receiver that answers 503 at
first is retried until it takes it; the dashboard's data lists both.
"""

from __future__ import annotations

import http.server
import json
import sqlite3
import threading
import time
import uuid

import httpx
import pytest
from support.ernie_demo import ernie_model, make_demo_ernie
from support.server import ServerProcess
from test_serving_workers import _listening_pids, _wait_until

FORMATS = ("generic", "slack", "dingtalk", "wecom")
FLAKY_FAILURES = 2


class Receiver(http.server.ThreadingHTTPServer):
    """Records POST bodies by path; /flaky answers 503 to its first FLAKY_FAILURES posts."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[dict]] = {}
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with receiver.lock:
                    receiver.attempts[self.path] = receiver.attempts.get(self.path, 0) + 1
                    failing = self.path == "/flaky" and receiver.attempts[self.path] <= FLAKY_FAILURES
                    if not failing:
                        receiver.bodies.setdefault(self.path, []).append(body)
                self.send_response(503 if failing else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("anomalies")
    demo = make_demo_ernie(work / "ernie-demo")
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{receiver.server_address[1]}"
    config = {
        "models": {"ernie": ernie_model(demo)},
        "ledger": {"url": str(work / "ledger.sqlite3")},
        "anomalies": {
            "interval_s": 1, "window_s": 60, "baseline_s": 600, "surge_factor": 3,
            "min_surge_tokens": 1000, "overlong_count": 10, "overlong_tokens": 64,
            "cooldown_s": 600, "webhook_retries": 4,
            "webhooks": [*({"url": f"{base}/{f}", "format": f} for f in FORMATS),
                         {"url": f"{base}/flaky", "format": "generic"}],
        },
    }
    with ServerProcess(work, config, workers=2) as server:
        _wait_until(lambda: len(_listening_pids(server.http_port)) == 2,
                    "both workers to listen", 180)
        yield server, receiver, work
    receiver.shutdown()


def _call(server, tenant: str, text: str) -> int:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    return httpx.post(f"{server.http_url}/v2/models/ernie/infer", json=body, timeout=30,
                      headers={"x-tenant": tenant, "x-request-id": uuid.uuid4().hex}).status_code


def test_a_surge_and_a_flood_raise_one_anomaly_each_in_every_format(stack):
    server, receiver, work = stack
    assert {_call(server, "surge", "付款 1,234.56 元 invoice total due") for _ in range(120)} == {200}
    assert {_call(server, "flood", "长文本 " * 200) for _ in range(12)} == {200}
    want = {("token_surge", "surge"), ("overlong_inputs", "flood")}

    def delivered() -> bool:
        with receiver.lock:
            return all(len(receiver.bodies.get(f"/{f}", [])) >= 2 for f in FORMATS)

    _wait_until(delivered, "both anomalies at every receiver", 60)
    time.sleep(4)  # both workers evaluate every second: nothing more may arrive (cooldown)
    with receiver.lock:
        bodies = {path: list(found) for path, found in receiver.bodies.items()}
    generic = bodies["/generic"]
    assert len(generic) == 2 and {(b["rule"], b["tenant"]) for b in generic} == want
    assert all(b["source"] == "paddle-meter" and b["summary"] for b in generic)
    assert len(bodies["/slack"]) == 2 and all("*[paddle-meter]" in b["text"] for b in bodies["/slack"])
    for fmt, field in (("dingtalk", "text"), ("wecom", "content")):
        assert len(bodies[f"/{fmt}"]) == 2
        assert all(b["msgtype"] == "markdown" and "[paddle-meter]" in b["markdown"][field]
                   for b in bodies[f"/{fmt}"])
    with sqlite3.connect(work / "ledger.sqlite3") as conn:
        rows = conn.execute("SELECT rule, tenant, delivered FROM anomalies").fetchall()
    assert {(r, t) for r, t, _ in rows} == want and len(rows) == 2
    assert all(json.loads(d) == [True] * 5 for _, _, d in rows)  # the flaky one too, in the end
    events = [json.loads(line) for line in server.logs().splitlines()
              if '"paddle_meter.anomaly"' in line]
    assert sorted((e["rule"], e["tenant"]) for e in events) == sorted(want)
    shown = httpx.get(f"{server.http_url}/v1/dashboard", timeout=30).json()["anomalies"]
    assert {(a["rule"], a["tenant"]) for a in shown} == want


def test_a_receiver_that_is_down_is_retried(stack):
    _, receiver, _ = stack
    with receiver.lock:
        attempts, got = receiver.attempts.get("/flaky", 0), len(receiver.bodies.get("/flaky", []))
    assert attempts == got + FLAKY_FAILURES and got == 2  # two 503s, then both delivered
