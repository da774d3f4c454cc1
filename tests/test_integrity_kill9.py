"""Billing integrity under SIGKILL: the real server is killed while clients retry.

Concurrent clients, one per surface (OIP gRPC, OIP HTTP, pipeline gRPC, pipeline HTTP) and
two tenants, send OCR requests with their own x-request-id and retry the same id (same
payload) until one succeeds; meanwhile the server is SIGKILLed and restarted on the same
data dir, ports and ledger several times. Afterwards, for SQLite and for PostgreSQL, every
(tenant, request id) has exactly one billed (``ok``) row, with the tokens the client was
told in x-usage-*: nothing lost, nothing counted twice, whatever moment the kill hit
(mid-inference, mid-commit, mid-response).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time

import pytest
from imaging import render_line
from support.metered_calls import (
    SURFACES,
    Endpoint,
    Outcome,
    SurfaceClient,
    billed_ok_rows,
    call_until_settled,
    ledger_discrepancies,
)
from support.pg import temporary_database
from support.server import ServerProcess

CLIENTS = 4
PER_CLIENT = 8
KILLS = 3
PREFIX = "k9-"


def _client(
    n: int,
    endpoint: Endpoint,
    told: dict[tuple[str, str], tuple[int, int]],
    attempts: list[Outcome],
    stop: threading.Event,
) -> None:
    surface, tenant = SURFACES[n % len(SURFACES)], f"k9t{n % 2}"
    with SurfaceClient(endpoint, timeout_s=30) as client:
        for i in range(PER_CLIENT):
            request_id = f"{PREFIX}{n}-{i}"
            image = render_line(f"ID {n}{i} PAY {i * 7}")
            tries = call_until_settled(
                client, surface, request_id, image, tenant=tenant, give_up=stop
            )
            attempts.extend(tries)
            if tries[-1].ok:
                told[(tenant, request_id)] = (tries[-1].input_tokens, tries[-1].output_tokens)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_every_request_billed_exactly_once_across_kill9(kind, tmp_path):
    with contextlib.ExitStack() as stack:
        if kind == "sqlite":
            url = str(tmp_path / "data" / "ledger.sqlite3")
        else:
            url = stack.enter_context(temporary_database("pm_kill9"))
        config = {"ledger": {"url": url}}
        server = ServerProcess(tmp_path, config).start()
        endpoint = Endpoint(server.http_url, server.grpc_address)
        told: dict[tuple[str, str], tuple[int, int]] = {}
        attempts: list[Outcome] = []
        stop = threading.Event()
        clients = [
            threading.Thread(target=_client, args=(n, endpoint, told, attempts, stop))
            for n in range(CLIENTS)
        ]
        for t in clients:
            t.start()
        rng = random.Random(9)
        try:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.4, 1.2))  # let some requests be in flight
                server.stop(signal.SIGKILL)
                # Same data dir and spool, same ports: the clients' connections come back.
                server = ServerProcess(
                    tmp_path, config, grpc_port=server.grpc_port, http_port=server.http_port
                ).start()
            for t in clients:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in clients), "clients did not finish"
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=60)
            assert server.stop() == 0, server.logs()[-3000:]
        billed = billed_ok_rows(url, PREFIX)
    refused = sorted({a.status for a in attempts if not (a.ok or a.retryable)})
    assert refused == []  # every attempt was served or cut off by a kill, then retried
    assert len(told) == CLIENTS * PER_CLIENT
    assert any(a.retryable for a in attempts)  # the kills were felt
    assert ledger_discrepancies(told, billed) == {
        "lost": {}, "doubled": {}, "unexpected": {}, "wrong_tokens": {}
    }
