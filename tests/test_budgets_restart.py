"""kill -9 during the budget race, then restart: spend is never reset, never leaked.

16 client threads keep calling the real server (PostgreSQL ledger) under one ERNIE budget.
The server is frozen (SIGSTOP) while calls hold reservations, the reservation rows are
counted (the dead process's reservations), then it is SIGKILLed and restarted on the same
ledger and ports, and the clients go on until every call is refused. Then:

- at restart the counter is rebuilt from the ledger (used + reserved covers everything
  billed before the kill: never reset to zero), and in the end ``used`` equals the
  ledger's sum and the billed tokens never exceed the limit;
- the killed process's reservations expire (``budgets.reservation_ttl_s``, 3 s here) and
  are swept: nothing stays reserved, no reservation row is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg
from support.ernie_demo import ernie_model, make_demo_ernie
from support.pg import temporary_database
from support.server import ServerProcess

PM = str(Path(sys.executable).with_name("paddle-meter"))
TEXT = "合同编号 HT-2026-0042 第三条"
CLIENTS = 16
TTL_S = 3


def _call(base_url: str) -> int:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]}
    try:
        return httpx.post(f"{base_url}/v2/models/ernie/infer", json=body, timeout=30,
                          headers={"x-tenant": "ops", "x-request-id": uuid.uuid4().hex}
                          ).status_code
    except httpx.HTTPError:
        return -1  # cut off by the kill


def _clients_until_refused(base_url: str, stop: threading.Event, seen: list[int]) -> None:
    while not stop.is_set():
        code = _call(base_url)
        seen.append(code)
        if code == 429:
            return
        if code == -1:
            time.sleep(0.2)


def _reservation_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM budget_reservations").fetchone()[0])


def _ledger_tokens(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute(
            "SELECT COALESCE(SUM(billable_tokens), 0) FROM usage_records "
            "WHERE tenant = 'ops' AND status = 'ok'").fetchone()[0])


def _show(workdir: Path, url: str) -> dict:
    done = subprocess.run(
        [PM, "budgets", "show", "--tenant", "ops", "--json", "--ledger", url],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PADDLE_METER_CONFIG": str(workdir / "config.yaml")})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[0]


def test_kill9_mid_race_keeps_spend_and_expires_dead_reservations(tmp_path):
    demo = make_demo_ernie(tmp_path / "ernie-demo")
    with temporary_database("pm_budget_k9") as url:
        config = {
            "models": {"ernie": ernie_model(demo)},
            "ledger": {"url": url},
            "budgets": {"reservation_ttl_s": TTL_S,
                        "limits": [{"tenant": "ops", "period": "month",
                                    "limit_tokens": 400 * 12}]},
        }
        server = ServerProcess(tmp_path, config).start()
        stop = threading.Event()
        seen: list[int] = []
        clients = [threading.Thread(target=_clients_until_refused,
                                    args=(server.http_url, stop, seen))
                   for _ in range(CLIENTS)]
        try:
            for t in clients:
                t.start()
            deadline = time.monotonic() + 60
            while seen.count(200) < 30 and time.monotonic() < deadline:
                time.sleep(0.05)
            held = 0
            for _ in range(20):  # freeze it while some calls hold reservations
                time.sleep(0.1)
                server.proc.send_signal(signal.SIGSTOP)
                held = _reservation_rows(url)
                if held:
                    break
                server.proc.send_signal(signal.SIGCONT)
            assert held > 0, "never caught a call holding its reservation"
            assert 200 in seen
            server.stop(signal.SIGKILL)
            billed_at_kill = _ledger_tokens(url)
            assert billed_at_kill > 0
            # Restart on the same ledger and ports: the clients' calls come back.
            server = ServerProcess(tmp_path, config, grpc_port=server.grpc_port,
                                   http_port=server.http_port).start()
            # Rebuilt from the ledger, never reset: a call billed but not settled when the
            # process died is still held by its reservation, so it is not counted twice.
            shown = _show(tmp_path, url)
            assert shown["used"] + shown["reserved"] >= billed_at_kill
            for t in clients:
                t.join(timeout=180)
            assert not any(t.is_alive() for t in clients)
            # The dead process's reservations expire (TTL 3 s) and are swept (every 5 s).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _reservation_rows(url):
                time.sleep(0.5)
            assert _reservation_rows(url) == 0
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                shown = _show(tmp_path, url)
                if shown["reserved"] == 0 and shown["used"] == _ledger_tokens(url):
                    break
                time.sleep(0.5)
            total = _ledger_tokens(url)
            assert (shown["used"], shown["reserved"]) == (total, 0)
            assert billed_at_kill <= total <= 400 * 12
            assert 429 in seen
        finally:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)
            stop.set()
            for t in clients:
                t.join(timeout=60)
            server.stop()
