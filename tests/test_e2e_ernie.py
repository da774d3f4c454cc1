"""ERNIE end to end: the real server with the (untrained) demo ERNIE, real clients, the real
collector; every billed count is checked against PaddleNLP 2.8.1's own ErnieTokenizer.

The demo model has random weights: only shapes, counts and metering are asserted here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from support.collector import OtlpSink, RotelCollector
from support.server import ServerProcess
from tritonclient.utils import InferenceServerException

from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PADDLENLP_PYTHON = (
    Path(os.environ.get("PADDLENLP_VENV", ROOT / ".venv-paddlenlp")) / "bin" / "python"
)
MAX_SEQ_LEN = 32
TEXTS = [
    "增值税发票金额很高",
    "Invoice No. 20261128 Total: 1,234.56 USD",
    "法院判决书 ¥1,000 © 2026 ™ 30°C",
    "患者主诉：头痛三天，体温38.5℃ 🙂",
    "ÉCOLE naïve café — résumé",
    "混合 text 和 数字 12345 以及 emoji 🇨🇳",
]


def paddlenlp_counts(vocab_dir: Path, cases: list[dict], tmp: Path) -> list[int]:
    if not PADDLENLP_PYTHON.exists():
        if os.environ.get("CI"):
            raise RuntimeError(f"{PADDLENLP_PYTHON} missing: scripts/setup_paddlenlp_venv.sh")
        pytest.skip("run scripts/setup_paddlenlp_venv.sh for the PaddleNLP reference")
    src, dst = tmp / f"cases-{uuid.uuid4().hex}.json", tmp / f"ids-{uuid.uuid4().hex}.json"
    src.write_text(json.dumps({"vocab_dir": str(vocab_dir), "cases": cases}), encoding="utf-8")
    subprocess.run(
        [str(PADDLENLP_PYTHON), str(ROOT / "tests/tools/paddlenlp_ids.py"), str(src), str(dst)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return [len(r["input_ids"]) for r in json.loads(dst.read_text(encoding="utf-8"))["results"]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ernie")
    demo = workdir / "ernie-demo"
    subprocess.run(
        [
            str(Path(sys.executable).with_name("paddle-meter")),
            "models",
            "make-demo-ernie",
            str(demo),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    options = {
        "model_dir": str(demo),
        "max_seq_len": MAX_SEQ_LEN,
        "max_batch_size": 8,
        "max_wait_ms": 20,
    }
    config = {
        "models": {
            "ernie": {"kind": "ernie", "options": {**options, "task": "text_classification"}},
            "ernie-embed": {"kind": "ernie", "options": {**options, "task": "embeddings"}},
        },
        "ledger": {"url": str(workdir / "ledger.sqlite3")},
    }
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(OtlpSink())
        collector = stack.enter_context(RotelCollector(sink.endpoint))
        env = {
            **collector.otel_env("grpc"),
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        server = stack.enter_context(ServerProcess(workdir, config, env=env))
        yield server, sink, demo, workdir


def _pipeline_http(
    server, fields: dict[str, str], headers=None, name="ernie", method="prediction"
) -> httpx.Response:
    return httpx.post(
        f"{server.http_url}/{name}/{method}",
        json={"key": list(fields), "value": list(fields.values())},
        headers=headers,
        timeout=60,
    )


def test_counts_everywhere_equal_paddlenlp(stack, tmp_path):
    server, sink, demo, workdir = stack
    long_text = "很长的合同条款" * 40
    texts = [*TEXTS, long_text]
    expected = paddlenlp_counts(
        demo, [{"text": t, "text_pair": None, "max_seq_len": MAX_SEQ_LEN} for t in texts], tmp_path
    )
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    channel = grpc.insecure_channel(server.grpc_address)
    stub = pb_grpc.PipelineServiceStub(channel)
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    for i, (text, count) in enumerate(zip(texts, expected, strict=True)):
        rid = f"{tenant}-{i}"
        headers = {"x-tenant": tenant, "x-request-id": rid}
        if i % 3 == 0:  # pipeline over HTTP: the count comes back in the headers
            reply = _pipeline_http(server, {"text": text}, headers)
            assert int(reply.headers["x-usage-input-tokens"]) == count
            values = dict(zip(reply.json()["key"], reply.json()["value"], strict=True))
            assert int(values["input_tokens"]) == count
            assert values["truncated"] == ("true" if text is long_text else "false")
        elif i % 3 == 1:  # pipeline over gRPC: trailing metadata
            response, call = stub.inference.with_call(
                pb.Request(name="ernie", key=["text"], value=[text]), metadata=list(headers.items())
            )
            assert response.err_no == 0, response.err_msg
            assert int(dict(call.trailing_metadata())["x-usage-input-tokens"]) == count
        else:  # OIP over gRPC with tritonclient
            tensor = triton_grpc.InferInput("text", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
            result = client.infer("ernie", [tensor], headers=headers)
            assert int(result.as_numpy("input_tokens")[0]) == count
            assert result.as_numpy("logits").shape == (1, 2)
        span = sink.wait_for_spans(
            lambda s, rid=rid: (
                s["kind"] == "SERVER" and s["attributes"].get("paddle_meter.request_id") == rid
            ),
            timeout=15,
        )[0]
        assert span["attributes"]["gen_ai.usage.input_tokens"] == count
        assert span["attributes"]["paddle_meter.billable_tokens"] == count
    channel.close()
    assert max(expected) == MAX_SEQ_LEN  # the long text was cut, and billed as processed
    sink.wait_for_metric_sum(
        "paddle_meter.tokens", sum(expected), timeout=20, **{"paddle_meter.tenant": tenant}
    )
    with contextlib.closing(sqlite3.connect(workdir / "ledger.sqlite3")) as db:
        rows = db.execute(
            "SELECT input_tokens, truncated FROM usage_records WHERE tenant = ? ORDER BY request_id",
            (tenant,),
        ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(expected)
    assert sum(bool(r[1]) for r in rows) == 1


def test_tokenize_service_matches_paddlenlp_and_is_not_billed(stack, tmp_path):
    server, _, demo, workdir = stack
    text, pair = "购买方北京某某科技有限公司", "Total: 1,234.56 USD"
    (expected,) = paddlenlp_counts(
        demo, [{"text": text, "text_pair": pair, "max_seq_len": MAX_SEQ_LEN}], tmp_path
    )
    rid = f"tok-{uuid.uuid4().hex[:6]}"
    reply = httpx.post(
        f"{server.http_url}/v1/tokenize",
        json={"model": "ernie", "text": text, "text_pair": pair},
        headers={"x-request-id": rid},
    )
    assert reply.status_code == 200 and reply.json()["count"] == expected
    assert set(reply.json()["token_type_ids"]) == {0, 1}
    with grpc.insecure_channel(server.grpc_address) as channel:
        response = pb_grpc.PipelineServiceStub(channel).inference(
            pb.Request(
                name="ernie", method="tokenize", key=["text", "text_pair"], value=[text, pair]
            )
        )
    assert (
        response.err_no == 0
        and json.loads(dict(zip(response.key, response.value, strict=True))["count"]) == expected
    )
    with contextlib.closing(sqlite3.connect(workdir / "ledger.sqlite3")) as db:
        assert (
            db.execute(
                "SELECT COUNT(*) FROM usage_records WHERE request_id = ?", (rid,)
            ).fetchone()[0]
            == 0
        )


def test_32_concurrent_requests_are_batched_and_each_gets_its_own_answer(stack, tmp_path):
    server, sink, demo, _ = stack
    texts = [f"第{i}号发票 amount {i * 13}.5 元 {'附加' * (i % 7)}" for i in range(32)]
    expected = paddlenlp_counts(
        demo, [{"text": t, "text_pair": None, "max_seq_len": MAX_SEQ_LEN} for t in texts], tmp_path
    )
    alone = {}
    for text in texts[:4]:  # answers when each runs alone, to compare batched answers with
        values = _pipeline_http(server, {"text": text}, name="ernie-embed").json()
        alone[text] = np.array(json.loads(values["value"][0]))

    def call(i: int) -> tuple[int, list[float], str]:
        rid = f"batch-{uuid.uuid4().hex[:8]}"
        reply = _pipeline_http(
            server, {"text": texts[i]}, {"x-request-id": rid}, name="ernie-embed"
        )
        values = dict(zip(reply.json()["key"], reply.json()["value"], strict=True))
        return int(values["input_tokens"]), json.loads(values["embedding"]), rid

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(32)))
    assert [r[0] for r in results] == expected
    for text, (_, embedding, _) in zip(texts[:4], results, strict=False):
        np.testing.assert_allclose(np.array(embedding), alone[text], rtol=1e-4, atol=1e-5)
    # Wait for a batch of several: the single-request spans of the calls above may reach
    # the collector in an earlier export than the batched ones.
    try:
        batched = sink.wait_for_spans(
            lambda s: s["name"] == "ernie.infer"
            and (s["attributes"].get("ernie.batch_size") or 0) > 1, timeout=30)
    except TimeoutError:
        batched = []
    assert batched, "no batch held more than one request"
    assert any(len(s["links"]) > 1 for s in batched)  # a batch span links to its requests


def test_bad_input_then_good_request(stack):
    server, *_ = stack
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"\xff\xfe not utf-8"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ernie", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "UTF-8" in info.value.message()
    wrong = triton_grpc.InferInput("sentence", [1], "BYTES")
    wrong.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ernie", [wrong])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "'text'" in info.value.message()
    reply = _pipeline_http(server, {"text": "   "})
    assert reply.json()["err_no"] == 5000 and "empty" in reply.json()["err_msg"]
    reply = _pipeline_http(server, {"sentence": "hello"})
    assert reply.json()["err_no"] == 5000 and "missing key 'text'" in reply.json()["err_msg"]
    reply = httpx.post(
        f"{server.http_url}/v2/models/ernie/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [""]}]},
    )
    assert reply.status_code == 400 and "empty" in reply.json()["error"]
    good = _pipeline_http(server, {"text": "正常的请求"})
    assert good.json()["err_no"] == 0
