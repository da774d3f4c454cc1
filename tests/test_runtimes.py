"""Both inference runtimes through the real server: Paddle Inference and OpenVINO.

One real ``paddle-meter serve`` holds the same PP-OCRv4 files twice (``ocr`` on OpenVINO,
``ocr-paddle`` on Paddle Inference) and the demo ERNIE twice (``ernie`` on Paddle
Inference from its PIR program, ``ernie-ov`` on OpenVINO from the ``inference.onnx`` that
the real ``paddle-meter models export-onnx`` wrote). Traces go through the real rotel
collector, bills into a real SQLite ledger. The demo ERNIE is UNTRAINED: its labels mean
nothing; the tests compare the two runtimes' logits and billed tokens, never labels.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from imaging import CORPUS, render_document, render_line, same_text
from support.collector import RotelCollector
from support.ernie_demo import make_demo_ernie
from support.otlp_sink import OtlpSink
from support.server import ServerProcess

PADDLE_METER = str(Path(sys.executable).with_name("paddle-meter"))

# The corpus beyond CORPUS: a longer contract-like page and lines of different lengths, so
# recognition sees several padded widths.
EXTRA_DOCUMENT = (
    "民事判决书 （2026）京0105民初12345号",
    "原告 北京某某科技有限公司 住所地北京市朝阳区",
    "被告 上海某某贸易有限公司",
    "本院认为 双方签订的买卖合同合法有效",
    "判决如下 被告于本判决生效之日起十日内支付货款 86400.00 元",
)
EXTRA_LINES = (
    "合计 ¥ 1,280.00",
    "Account 6222 0210 0112 3456 789",
    "开户行 中国工商银行股份有限公司北京朝阳支行 营业部",
)


def _corpus() -> list[tuple[str, bytes]]:
    images = [(item.name, item.data) for item in CORPUS]
    images.append(("judgement", render_document(EXTRA_DOCUMENT)))
    images += [(f"line{i}", render_line(text)) for i, text in enumerate(EXTRA_LINES)]
    return images


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runtimes")
    demo = make_demo_ernie(workdir / "ernie-demo")
    export = subprocess.run([PADDLE_METER, "models", "export-onnx", str(demo)],
                            capture_output=True, text=True, timeout=600, check=True)
    assert "checked against Paddle Inference" in export.stdout, export.stdout
    ledger = workdir / "ledger.sqlite3"
    ernie = {"model_dir": str(demo), "task": "text_classification", "max_seq_len": 64,
             "max_wait_ms": 20}
    config = {
        "models": {
            # A longer batching wait than the default, so concurrent calls share batches
            # even when detection finishes them one after another.
            "ocr": {"kind": "ocr", "options": {"runtime": "openvino", "rec_max_wait_ms": 50}},
            "ocr-paddle": {"kind": "ocr", "options": {"runtime": "paddle"}},
            "ernie": {"kind": "ernie", "options": {**ernie, "runtime": "paddle"}},
            "ernie-ov": {"kind": "ernie", "options": {**ernie, "runtime": "openvino"}},
        },
        "ledger": {"url": str(ledger)},
    }
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(OtlpSink())
        collector = stack.enter_context(RotelCollector(sink.endpoint))
        env = {**collector.otel_env("grpc"), "OTEL_BSP_SCHEDULE_DELAY": "100"}
        server = stack.enter_context(ServerProcess(workdir, config, env=env))
        yield server, sink, ledger, demo


def _ledger_row(ledger: Path, request_id: str) -> dict:
    with contextlib.closing(sqlite3.connect(ledger)) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute(
            "SELECT * FROM usage_records WHERE request_id = ?", (request_id,))]
    assert len(rows) == 1, (request_id, rows)
    return rows[0]


def _ocr(server, model: str, image: bytes, request_id: str) -> tuple[list[dict], httpx.Response]:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(image).decode()]}]}
    reply = httpx.post(f"{server.http_url}/v2/models/{model}/infer", json=body,
                       headers={"x-request-id": request_id, "x-tenant": "runtimes"}, timeout=120)
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    return json.loads(outputs["result"]["data"][0])["lines"], reply


def test_each_model_says_which_runtime_runs_it(stack):
    server, *_ = stack
    loaded = {}
    for line in server.logs().splitlines():
        if line.startswith("{") and '"model loaded"' in line:
            entry = json.loads(line)
            loaded[entry["model"]] = entry["runtime"]
    assert loaded == {"ocr": "openvino", "ocr-paddle": "paddle", "ernie": "paddle",
                      "ernie-ov": "openvino"}
    platforms = {name: httpx.get(f"{server.http_url}/v2/models/{name}").json()["platform"]
                 for name in loaded}
    assert platforms == {"ocr": "openvino", "ocr-paddle": "paddle_inference",
                         "ernie": "paddle_inference", "ernie-ov": "openvino"}


def test_both_runtimes_read_the_whole_corpus_identically(stack):
    server, _, ledger, _ = stack
    for name, image in _corpus():
        answers = {}
        for model in ("ocr", "ocr-paddle"):
            request_id = f"rt-{model}-{name}-{uuid.uuid4().hex[:6]}"
            lines, reply = _ocr(server, model, image, request_id)
            answers[model] = (lines, reply.headers["x-usage-output-tokens"],
                              _ledger_row(ledger, request_id))
        (ov_lines, ov_usage, ov_row), (pd_lines, pd_usage, pd_row) = answers.values()
        assert [line["text"] for line in ov_lines] == [line["text"] for line in pd_lines], name
        assert ov_lines, name
        for ov, pd in zip(ov_lines, pd_lines, strict=True):
            assert all(abs(a - b) <= 1 for p, q in zip(ov["box"], pd["box"], strict=True)
                       for a, b in zip(p, q, strict=True)), (name, ov["box"], pd["box"])
        assert ov_usage == pd_usage == str(sum(len(line["text"]) for line in ov_lines))
        billed = ("characters", "output_tokens", "input_tokens", "images")
        assert {k: ov_row[k] for k in billed} == {k: pd_row[k] for k in billed}, name
    # The corpus's known lines are read right, not merely alike on both runtimes.
    document, _ = _ocr(server, "ocr", render_document(EXTRA_DOCUMENT), f"doc-{uuid.uuid4().hex}")
    assert len(document) == len(EXTRA_DOCUMENT)
    for line, expected in zip(document, EXTRA_DOCUMENT, strict=True):
        assert same_text(line["text"], expected), (line["text"], expected)


def test_concurrent_images_share_recognition_batches_and_keep_their_own_lines(stack):
    server, sink, ledger, _ = stack
    texts = [f"收据编号 {20000 + i} 金额 {i * 13}.25 元" for i in range(16)]
    request_ids = [f"batch-{i}-{uuid.uuid4().hex[:6]}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_ocr, server, "ocr", render_line(text), rid)
                   for text, rid in zip(texts, request_ids, strict=True)]
        results = [f.result(timeout=300)[0] for f in futures]
    for text, lines, rid in zip(texts, results, request_ids, strict=True):
        assert len(lines) == 1 and same_text(lines[0]["text"], text), (lines, text)
        row = _ledger_row(ledger, rid)
        assert row["characters"] == len(lines[0]["text"]) and row["images"] == 1
    batches = sink.wait_for_spans(
        lambda s: s["name"] == "ocr.rec.batch"
        and (s["attributes"].get("ocr.batch.requests") or 0) > 1, timeout=30)
    ours = {s["trace_id"] for s in sink.spans() if s["kind"] == "SERVER"
            and s["attributes"].get("paddle_meter.request_id") in request_ids}
    shared = [b for b in batches if len({link["trace_id"] for link in b["links"]} & ours) > 1]
    assert shared, "no recognition batch served more than one of the 16 requests"
    assert all(b["attributes"]["ocr.crops"] >= b["attributes"]["ocr.batch.requests"]
               for b in shared)


def _ernie(server, model: str, text: str, request_id: str) -> dict:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    reply = httpx.post(f"{server.http_url}/v2/models/{model}/infer", json=body,
                       headers={"x-request-id": request_id, "x-tenant": "runtimes"}, timeout=120)
    assert reply.status_code == 200, reply.text
    return {o["name"]: o["data"] for o in reply.json()["outputs"]}


def test_ernie_on_openvino_answers_like_paddle_and_bills_the_same_tokens(stack):
    server, _, ledger, _ = stack
    texts = ["合同约定的付款期限已届满", "Invoice 20261128 total 1,234.56 USD",
             "本院认为，被告应当承担违约责任。" * 6, "短"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # batched, lengths mixed
        calls = {(model, i): pool.submit(_ernie, server, model, text, f"e-{model}-{i}-{uuid.uuid4().hex[:6]}")
                 for model in ("ernie", "ernie-ov") for i, text in enumerate(texts)}
        answers = {key: future.result(timeout=120) for key, future in calls.items()}
    for i in range(len(texts)):
        paddle_out, openvino_out = answers[("ernie", i)], answers[("ernie-ov", i)]
        assert paddle_out.keys() == openvino_out.keys()
        logits_pd, logits_ov = paddle_out["logits"], openvino_out["logits"]
        assert max(abs(a - b) for a, b in zip(logits_pd, logits_ov, strict=True)) < 1e-4
    with contextlib.closing(sqlite3.connect(ledger)) as conn:
        rows = conn.execute(
            "SELECT model, request_id, input_tokens FROM usage_records WHERE request_id LIKE 'e-%'"
        ).fetchall()
    tokens = {(model, rid.split("-")[-2]): n for model, rid, n in rows}
    for i in range(len(texts)):
        assert tokens[("ernie", str(i))] == tokens[("ernie-ov", str(i))] > 2


def test_bad_runtime_and_unreadable_model_fail_at_start_up(stack, tmp_path):
    *_, demo = stack
    pir_only = tmp_path / "pir-only"
    shutil.copytree(demo, pir_only, ignore=shutil.ignore_patterns("inference.onnx"))
    cases = [
        ({"ocr": {"kind": "ocr", "options": {"runtime": "tensorrt"}}},
         "model 'ocr': runtime must be one of paddle, openvino, auto, got 'tensorrt'"),
        ({"ernie": {"kind": "ernie", "options": {"model_dir": str(pir_only),
                                                   "runtime": "openvino"}}},
         "which OpenVINO cannot read; write an inference.onnx beside it with `paddle-meter "
         f"models export-onnx {pir_only}`, or use runtime: paddle"),
        ({"ocr": {"kind": "ocr", "options": {"runtime": "paddle", "precision": "bf16"}}},
         "precision bf16 is available on runtime openvino only"),
    ]
    for n, (models, message) in enumerate(cases):
        config = tmp_path / f"bad{n}.yaml"
        config.write_text(json.dumps({"server": {"data_dir": str(tmp_path / "data"),
                                                 "grpc_port": 0, "http_port": 0},
                                      "models": models}), encoding="utf-8")
        proc = subprocess.run([PADDLE_METER, "serve", "--config", str(config)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr.splitlines()[-1], proc.stderr
        assert "Traceback" not in proc.stderr


def test_compiled_models_are_cached_under_the_data_dir_and_reused(stack):
    server, *_ = stack
    compiled = server.workdir / "data" / "compiled"
    blobs = {p.relative_to(compiled): p.stat().st_mtime_ns for p in compiled.rglob("*.blob")}
    assert {p.parts[0] for p in blobs} == {"ocr", "ernie-ov"}, blobs
    assert sum(1 for p in blobs if p.parts[0] == "ocr") == 3  # det, cls, rec
    server.stop()
    server.start()
    again = {p.relative_to(compiled): p.stat().st_mtime_ns for p in compiled.rglob("*.blob")}
    assert again == blobs  # read back, not compiled and written again
    lines, _ = _ocr(server, "ocr", CORPUS["cjk_invoice"].data, f"after-{uuid.uuid4().hex}")
    assert same_text(lines[0]["text"], CORPUS["cjk_invoice"].lines[0])
