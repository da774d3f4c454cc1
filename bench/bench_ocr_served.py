"""OCR images/s and latency: in-process vs served over gRPC (1 and 2 workers), one run.

Rows, measured in interleaved rounds on the same images with the same client concurrency:
(a) our OcrAdapter called in-process, (b) the real ``paddle-meter serve`` process (metering
on, SQLite ledger) called through the real ``tritonclient.grpc`` with 1 and with 2 worker
processes, and (c) PaddleOCR 3.x's own pipeline in-process on the same model files (its own
venv; see bench_ocr_inprocess.py). Target: (b, 1 worker) >= 0.9x (a); (a) faster than (c).

    .venv/bin/python bench/bench_ocr_served.py --seconds 10 --rounds 3
writes docs/bench_ocr_served.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

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


def _grpc_call(address: str):
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(address)

    def call(image: bytes) -> list[str]:
        tensor = triton_grpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        return client.infer("ocr", [tensor]).as_numpy("text")[0].decode().split("\n")

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--skip-paddleocr", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_ocr_served.md")
    args = parser.parse_args()

    from imaging import CORPUS
    from support.server import ServerProcess

    items = list(CORPUS)
    images = [item.data for item in items]
    one_worker = {"pool_size": 1, "cpu_threads": 2, "runtime": "paddle"}
    per_worker = {"pool_size": 1, "cpu_threads": 1, "runtime": "paddle"}
    labels = {
        "a": f"(a) OcrAdapter in-process, {one_worker}",
        "b1": f"(b) served over gRPC, 1 worker, {one_worker}",
        "b2": f"(b) served over gRPC, 2 workers, {per_worker} each",
        "c": "(c) PaddleOCR 3.x in-process, det+rec",
    }
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in labels}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        paths = []
        for item in items:
            path = tmp_path / f"{item.name}.png"
            path.write_bytes(item.data)
            paths.append(path)
        model = lambda options: {"models": {"ocr": {"kind": "ocr", "options": options}}}  # noqa: E731
        with ServerProcess(tmp_path / "w1", model(one_worker)) as w1, ServerProcess(
            tmp_path / "w2", model(per_worker), workers=2
        ) as w2:
            for _ in range(args.rounds):
                runs["a"].append(bench_inprocess(images, args.seconds, one_worker, args.concurrency))
                runs["b1"].append(time_calls(_grpc_call(w1.grpc_address), images, args.seconds, args.concurrency))
                runs["b2"].append(time_calls(_grpc_call(w2.grpc_address), images, args.seconds, args.concurrency))
                if not args.skip_paddleocr:
                    runs["c"].append(bench_paddleocr(paths, args.seconds, 2))
    merged = {key: merge_runs(value) for key, value in runs.items() if value}
    rows = [(labels[key], merged[key]) for key in labels if key in merged]
    ratio = merged["b1"]["images_per_s"] / merged["a"]["images_per_s"]
    meta = {
        "images": ", ".join(f"{item.name} ({len(item.lines)} lines)" for item in items),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "client concurrency": args.concurrency,
        "load": f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "(b, 1 worker) / (a)": f"{ratio:.2f}x (target >= 0.9x)",
    }
    if "c" in merged:
        meta["(a) / (c)"] = f"{merged['a']['images_per_s'] / merged['c']['images_per_s']:.2f}x (target > 1x)"
    markdown = "\n".join(
        [
            "## OCR served: in-process vs gRPC (1 and 2 workers) vs PaddleOCR 3.x",
            "",
            "`.venv/bin/python bench/bench_ocr_served.py` — rows interleaved per round, "
            "latencies pooled, warm-up pass first. The served rows include everything a "
            "client pays for: gRPC, OIP tensor coding, metering (spans, metrics) and the "
            "durable SQLite ledger write before each response.",
            "",
            *(f"- {key}: {value}" for key, value in meta.items()),
            "",
            "| pipeline | concurrency | calls | images/s | p50 ms | p95 ms | mean ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *(_row(label, r) for label, r in rows),
            "",
        ]
    )
    args.out.write_text(markdown, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
