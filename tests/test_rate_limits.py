"""Rate limits and budget visibility on the real server with ``--workers 2`` and API keys.

- Requests per minute per key hold across both workers: a keep-alive connection pinned to
  each worker (found from /proc), calls alternating between them: the key's 10 requests
  are served (5 by each worker, neither near 10 alone), then both refuse with 429 and
  ``Retry-After``.
- Billable tokens per minute per key: ERNIE's exact token count is taken before the call,
  so a key sending 64-token texts gets floor(300 / 64) = 4 calls, then 429.
- Budget refusals on every transport: HTTP 429, gRPC RESOURCE_EXHAUSTED with a
  ``retry-after`` trailer, the pipeline's err_no 4029; refused calls are never billed.
- A soft-limit crossing is one structured event in the log; ``GET /v1/budgets`` is scoped
  like ``/v1/usage``; ``paddle_meter.budget.used`` / ``.limit`` are on /metrics.

The demo ERNIE is untrained (no weights are reachable here): only its token counts matter.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from support.ernie_demo import ernie_model, make_demo_ernie
from support.keys import auth_env, create_key
from support.server import ServerProcess
from test_auth_workers import connections_to_each_worker
from test_serving_workers import _listening_pids, _wait_until
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

PM = str(Path(sys.executable).with_name("paddle-meter"))
RPM = 10
TPM = 300
SHORT = "付款 12 元"
LONG = "长文本 " * 200  # truncated to max_seq_len: exactly 64 tokens


def _infer_body(text: str) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rate-limits")
    demo = make_demo_ernie(workdir / "ernie-demo")
    ledger = workdir / "ledger.sqlite3"
    config = {
        "models": {"ernie": ernie_model(demo)},
        "ledger": {"url": str(ledger)},
        "auth": {"mode": "required", "cache_ttl_s": 1},
        "rate_limits": {"requests_per_minute": RPM, "tokens_per_minute": TPM},
        "budgets": {"refresh_s": 1, "limits": [
            {"tenant": "vis", "period": "day", "limit_requests": 4, "soft": 0.5},
        ]},
    }
    env = auth_env()
    server = ServerProcess(workdir, config, env=env, workers=2).start()
    try:
        _wait_until(lambda: len(_listening_pids(server.http_port)) == 2,
                    "both workers to listen", 180)
        yield server, env, ledger
    finally:
        server.stop()


def _billed_rows(ledger: Path, key_id: str) -> int:
    with sqlite3.connect(ledger) as conn:
        return conn.execute("SELECT COUNT(*) FROM usage_records WHERE api_key_id = ?",
                            (key_id,)).fetchone()[0]


def test_requests_per_minute_hold_across_two_workers(stack):
    server, env, ledger = stack
    key_id, key = create_key(server, "rl", "caller", env=env)
    workers = connections_to_each_worker(server)
    answers: list[tuple[int, int, dict[str, str], str]] = []
    try:
        for i in range(RPM + 2):
            pid, conn = list(workers.items())[i % 2]
            status, headers, text = conn.request("POST", "/v2/models/ernie/infer", key,
                                                 _infer_body(SHORT))
            answers.append((pid, status, headers, text))
    finally:
        for conn in workers.values():
            conn.close()
    statuses = [a[1] for a in answers]
    assert statuses[:RPM] == [200] * RPM, statuses
    assert statuses[RPM:] == [429, 429], statuses
    assert {a[0] for a in answers[RPM:]} == set(workers)  # both workers refuse
    for _, _, headers, text in answers[RPM:]:
        assert f"rate limit of {RPM:,} requests per minute reached for {key_id}" in text
        assert 1 <= int(headers["retry-after"]) <= 60 / RPM + 1
    assert _billed_rows(ledger, key_id) == RPM


def test_tokens_per_minute_count_exact_tokens_before_inference(stack):
    server, env, ledger = stack
    key_id, key = create_key(server, "rl", "caller", env=env)
    counted = httpx.post(f"{server.http_url}/v1/tokenize", json={"model": "ernie", "text": LONG},
                         headers={"authorization": f"Bearer {key}"}, timeout=30).json()
    assert counted["count"] == 64
    statuses = []
    for _ in range(TPM // 64 + 1):
        reply = httpx.post(f"{server.http_url}/v2/models/ernie/infer", json=_infer_body(LONG),
                           headers={"authorization": f"Bearer {key}"}, timeout=30)
        statuses.append(reply.status_code)
    assert statuses == [200] * (TPM // 64) + [429], statuses
    assert f"rate limit of {TPM:,} billable tokens per minute" in reply.json()["error"]
    assert _billed_rows(ledger, key_id) == TPM // 64


def _grpc_infer(server, key: str) -> grpc.RpcError | None:
    text = SHORT.encode()
    request = oip_pb.ModelInferRequest(
        model_name="ernie",
        inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES",
                                                          shape=[1])],
        raw_input_contents=[struct.pack("<I", len(text)) + text])
    with grpc.insecure_channel(server.grpc_address) as channel:
        try:
            oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=[("authorization", f"Bearer {key}")], timeout=30)
        except grpc.RpcError as exc:
            return exc
    return None


def test_budget_refusals_on_every_transport_and_visibility(stack):
    server, env, ledger = stack
    key_id, key = create_key(server, "vis", "caller", env=env)
    auditor = create_key(server, "vis", "auditor", env=env)[1]
    other_auditor = create_key(server, "rl", "auditor", env=env)[1]
    admin = create_key(server, "ops", "admin", env=env)[1]
    bearer = {"authorization": f"Bearer {key}"}
    for _ in range(4):  # the day's allowance of tenant vis
        assert httpx.post(f"{server.http_url}/v2/models/ernie/infer", json=_infer_body(SHORT),
                          headers=bearer, timeout=30).status_code == 200
    refused = httpx.post(f"{server.http_url}/v2/models/ernie/infer", json=_infer_body(SHORT),
                         headers=bearer, timeout=30)
    assert refused.status_code == 429
    message = refused.json()["error"]
    assert message.startswith("tenant vis has used 4 of 4 requests today; resets ")
    assert int(refused.headers["retry-after"]) >= 1
    error = _grpc_infer(server, key)
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant vis has used 4 of 4 requests today" in error.details()
    assert int(dict(error.trailing_metadata())["retry-after"]) >= 1
    piped = httpx.post(f"{server.http_url}/ernie/prediction", timeout=30, headers=bearer,
                       json={"key": ["text"], "value": [SHORT]})
    assert piped.status_code == 200 and piped.json()["err_no"] == 4029, piped.text
    assert "tenant vis has used 4 of 4 requests" in piped.json()["err_msg"]
    assert _billed_rows(ledger, key_id) == 4  # refusals are not in the ledger

    # One soft-limit event (50% of 4 = the 2nd call), logged by the worker that crossed it.
    _wait_until(lambda: "paddle_meter.budget.soft_limit" in server.logs(), "soft event", 10)
    events = [json.loads(line) for line in server.logs().splitlines()
              if '"paddle_meter.budget.soft_limit"' in line]
    assert len(events) == 1
    assert events[0]["paddle_meter.budget.id"] == "vis/*/day/requests"
    assert events[0]["used"] == "2 requests" and events[0]["limit"] == "4 requests"

    def budgets(token: str, **params) -> httpx.Response:
        return httpx.get(f"{server.http_url}/v1/budgets", params=params, timeout=30,
                         headers={"authorization": f"Bearer {token}"})

    own = budgets(auditor)
    assert own.status_code == 200
    rows = own.json()["budgets"]
    assert [(r["tenant"], r["used"], r["remaining"], r["soft_reached"]) for r in rows] == [
        ("vis", 4, 0, True)]
    assert budgets(other_auditor).json()["budgets"] == []  # tenant rl has no budget
    assert budgets(other_auditor, tenant="vis").status_code == 403
    assert budgets(key).status_code == 403  # a caller key reads no budgets
    assert [r["tenant"] for r in budgets(admin).json()["budgets"]] == ["vis"]
    time.sleep(1.5)  # the gauges refresh every budgets.refresh_s
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    used = [line for line in metrics.splitlines()
            if line.startswith("paddle_meter_budget_used{") and '"vis/*/day/requests"' in line]
    limit = [line for line in metrics.splitlines()
             if line.startswith("paddle_meter_budget_limit{") and '"vis/*/day/requests"' in line]
    assert used and used[0].endswith(" 4.0") and limit and limit[0].endswith(" 4.0")
