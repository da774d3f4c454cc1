"""Billing integrity under SIGKILL: the real server is killed while clients retry.

A few concurrent clients send OCR requests with their own x-request-id and retry the same
id (same payload) until one succeeds; meanwhile the server is SIGKILLed and restarted on
the same data dir several times. Afterwards every id is in the ledger exactly once, with
the output tokens the client was told in x-usage-output-tokens: nothing lost, nothing
counted twice, whatever moment the kill hit (mid-inference, mid-commit, mid-response).
"""

from __future__ import annotations

import base64
import contextlib
import random
import signal
import sqlite3
import threading
import time

import httpx
import psycopg
import pytest
from imaging import render_line
from support.pg import temporary_database
from support.server import ServerProcess

CLIENTS = 4
PER_CLIENT = 8
KILLS = 3


class _Current:
    """The server now running; clients read its URL before every attempt."""

    def __init__(self) -> None:
        self.url = ""
        self.lock = threading.Lock()


def _client(
    n: int, current: _Current, told: dict[str, int], failed: list[str], stop: threading.Event
) -> None:
    for i in range(PER_CLIENT):
        request_id = f"k9-{n}-{i}"
        body = {
            "key": ["image"],
            "value": [base64.b64encode(render_line(f"ID {n}{i} PAY {i * 7}")).decode()],
        }
        while not stop.is_set():
            with current.lock:
                url = current.url
            try:
                reply = httpx.post(
                    f"{url}/ocr/prediction",
                    json=body,
                    timeout=20,
                    headers={"x-request-id": request_id},
                )
            except httpx.HTTPError:
                failed.append(request_id)
                time.sleep(0.05)  # killed or restarting: retry the same id
                continue
            if reply.status_code == 200 and reply.json().get("err_no", 0) == 0:
                assert reply.headers["x-request-id"] == request_id
                told[request_id] = int(reply.headers["x-usage-output-tokens"])
                break
            time.sleep(0.05)


def _ledger(url: str) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    query = "SELECT request_id, output_tokens FROM usage_records WHERE request_id LIKE 'k9-%'"
    if url.startswith("postgresql://"):
        with psycopg.connect(url) as conn:
            result = conn.execute(query).fetchall()
    else:
        with contextlib.closing(sqlite3.connect(url)) as conn:
            result = conn.execute(query).fetchall()
    for request_id, tokens in result:
        rows.setdefault(request_id, []).append(int(tokens))
    return rows


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_every_request_billed_exactly_once_across_kill9(kind, tmp_path):
    with contextlib.ExitStack() as stack:
        if kind == "sqlite":
            url = str(tmp_path / "data" / "ledger.sqlite3")
        else:
            url = stack.enter_context(temporary_database("pm_kill9"))
        config = {"ledger": {"url": url}}
        current = _Current()
        server = ServerProcess(tmp_path, config).start()
        current.url = server.http_url
        told: dict[str, int] = {}
        failed: list[str] = []  # attempts cut off by a kill or refused during a restart
        stop = threading.Event()
        clients = [
            threading.Thread(target=_client, args=(n, current, told, failed, stop))
            for n in range(CLIENTS)
        ]
        for t in clients:
            t.start()
        rng = random.Random(9)
        try:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.4, 1.2))  # let some requests be in flight
                server.stop(signal.SIGKILL)
                server = ServerProcess(tmp_path, config).start()  # same data dir and spool
                with current.lock:
                    current.url = server.http_url
            for t in clients:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in clients), "clients did not finish"
        finally:
            stop.set()
            assert server.stop() == 0, server.logs()[-3000:]
        billed = _ledger(url)
    assert len(told) == CLIENTS * PER_CLIENT and failed  # the kills were felt
    assert sorted(billed) == sorted(told)  # every id, nothing else
    assert {k: v for k, v in billed.items() if len(v) != 1} == {}  # exactly once
    assert {k: v[0] for k, v in billed.items()} == told  # what the client was told
