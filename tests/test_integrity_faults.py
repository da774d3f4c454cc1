"""Billing integrity when a peer fails under load: PostgreSQL restarted, the collector down.

The real server runs while four clients (one per surface: OIP gRPC, OIP HTTP, pipeline
gRPC, pipeline HTTP) call it with their own ids, each retried with the same payload while
the answer is retryable (support/metered_calls.py). Meanwhile a peer fails:

- PostgreSQL, the ledger, is stopped with ``pg_ctlcluster`` (fast: the server's sessions
  are cut) and held down until every client was served a call begun during the outage (or
  20 s), then started again. A call in the outage is served with its record spooled, or
  refused cleanly (UNAVAILABLE / 503 / err_no 3001) and covered by its retry. Stop and start
  instead of one ``restart`` so the outage is sure to span calls.
- The OTLP collector (a real rotel-agent) is SIGKILLed for 60 s: no call may fail, and
  spans of calls made after it is back arrive.

Afterwards (the spool replayed) every (tenant, id) a client was told about has exactly one
billed row with the tokens it was told; nothing else is billed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from imaging import render_line
from support.collector import FAST_EXPORT_ENV, OtlpSink, RotelCollector
from support.metered_calls import (
    SURFACES,
    Endpoint,
    LoadClient,
    billed_ok_rows,
    ledger_discrepancies,
)
from support.pg import cluster_ctl, ensure_cluster_up, temporary_database
from support.server import ServerProcess

EXACT = {"lost": {}, "doubled": {}, "unexpected": {}, "wrong_tokens": {}}
COLLECTOR_DOWN_S = 60  # the outage
CLEAN_REFUSALS = {"grpc UNAVAILABLE", "http 503", "err_no 3001"}


def _image(n: int, i: int) -> bytes:
    return render_line(f"F{n} NO {i} PAY {i * 3}")


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def _load(server: ServerProcess, prefix: str) -> Iterator[list[LoadClient]]:
    """Four clients, one per surface, two tenants, calling until the block ends."""
    stop = threading.Event()
    endpoint = Endpoint(server.http_url, server.grpc_address)
    clients = [
        LoadClient(n, endpoint, prefix=prefix, image=_image, stop=stop,
                   surfaces=(surface,), tenant=f"{prefix}t{n % 2}", timeout_s=30)
        for n, surface in enumerate(SURFACES)
    ]
    for client in clients:
        client.start()
    try:
        yield clients
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
            client.abandon.set()  # a client still retrying now would retry forever
            client.join(timeout=30)
    assert [c.error for c in clients if c.error] == []
    assert not any(c.is_alive() for c in clients), "clients did not finish their last call"


def _told(clients: list[LoadClient]) -> dict:
    return {key: tokens for c in clients for key, tokens in c.told.items()}


def test_postgresql_restart_under_load_loses_and_doubles_nothing(tmp_path):
    prefix = "pgr-"
    with temporary_database("pm_pgrestart") as url:
        server = ServerProcess(tmp_path, {"ledger": {"url": url, "retry_interval_s": 0.5}})
        with server:
            with _load(server, prefix) as clients:
                try:
                    _wait(lambda: all(c.served_since(0) >= 2 for c in clients), 120, "warm-up")
                    cluster_ctl("stop")
                    down = time.monotonic()
                    with contextlib.suppress(AssertionError):  # held 20 s at most
                        _wait(lambda: all(c.served_since(down) for c in clients), 20, "outage")
                    cluster_ctl("start")
                    up = time.monotonic()
                finally:
                    ensure_cluster_up()  # other tests, and the next runs, need it
                _wait(lambda: all(c.served_since(up) >= 2 for c in clients), 120, "after")
            told = _told(clients)
            # The spool is replayed into the database every retry_interval_s.
            _wait(lambda: set(billed_ok_rows(url, prefix)) >= set(told), 120, "spool replay")
        billed = billed_ok_rows(url, prefix)
    attempts = [a for c in clients for a in c.attempts]
    assert [a for a in attempts if a.kind != "good"] == []
    assert {a.outcome.status for a in attempts} <= {"ok"} | CLEAN_REFUSALS
    assert [k for c in clients for k in c.unsettled] == []
    assert [a for a in attempts if down < a.started < up]  # calls overlapped the outage
    assert ledger_discrepancies(told, billed) == EXACT


def test_collector_killed_for_60s_fails_no_call_and_telemetry_resumes(tmp_path):
    prefix = "otl-"
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(OtlpSink())
        collector = stack.enter_context(RotelCollector(sink.endpoint))
        server = stack.enter_context(
            ServerProcess(tmp_path, {}, env={**collector.otel_env("grpc"), **FAST_EXPORT_ENV})
        )

        def span_of(keys: Callable[[], set[str]]) -> Callable[[dict], bool]:
            return lambda span: (
                span["kind"] == "SERVER"
                and span["attributes"].get("paddle_meter.request_id") in keys()
            )

        with _load(server, prefix) as clients:
            sink.wait_for_spans(span_of(lambda: {k[1] for c in clients for k in c.told}), 60)
            collector.kill()
            killed = time.monotonic()
            time.sleep(COLLECTOR_DOWN_S)
            collector.start()  # same ports: the server's exporter reconnects
            back = time.monotonic()
            # The exporter's reconnect backoff may drop the first batches: keep calling.
            sink.wait_for_spans(
                span_of(lambda: {
                    a.key[1] for c in clients for a in c.attempts
                    if a.started > back and a.outcome.ok
                }),
                180,
            )
        told = _told(clients)
    billed = billed_ok_rows(str(tmp_path / "data" / "ledger.sqlite3"), prefix)
    attempts = [a for c in clients for a in c.attempts]
    assert {a.outcome.status for a in attempts} == {"ok"}  # not one call failed
    assert [a for a in attempts if killed < a.started < back]  # calls during the outage
    assert ledger_discrepancies(told, billed) == EXACT
