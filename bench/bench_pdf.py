"""Pages/s for a 10-page PDF: served over PaddleX's ``POST /ocr`` vs PaddleOCR 3.x in-process.

The bench renders a 10-page PDF (court-judgement-like CJK pages and invoice pages, with
tests/imaging.py's font, written by Pillow at 144 dpi) and times, in one run on the same PDF
and the same PP-OCRv4 det/rec model files:
(a) the real ``paddle-meter serve`` process (metering on, durable SQLite ledger) called
    exactly as PaddleOCR 3.x's serving docs call PaddleX (``requests.post(url, json={"file":
    ..., "fileType": 0, "visualize": False})``), on OpenVINO (the embedded default) and on
    Paddle Inference; text-line orientation off, as in the reference;
(b) PaddleOCR 3.x's own pipeline in-process in .venv-bench-paddleocr, reading the PDF itself
    (bench/_paddleocr_ref/run_paddleocr_pdf.py), det+rec, Paddle Inference with oneDNN.
One call = the whole PDF, one client; pages/s = 10 x calls / wall time. The text of every
page is compared between the rows.

    .venv/bin/python bench/bench_pdf.py --seconds 25
writes docs/bench_pdf.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from bench_ocr_inprocess import PADDLEOCR_PYTHON, time_calls  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "_paddleocr_ref" / "run_paddleocr_pdf.py"
N_PAGES = 10


def make_pdf() -> bytes:
    from imaging import DOCUMENT_LINES, JUDGEMENT_LINES, render_pdf

    pages = []
    for i in range(N_PAGES):
        if i % 2 == 0:
            lines = [*JUDGEMENT_LINES, f"本判决书第{i + 1}页 共{N_PAGES}页"]
        else:
            lines = [*DOCUMENT_LINES, f"Page {i + 1} of {N_PAGES} 合计 {1000 + 37 * i}.50 元"]
        pages.append(lines)
    return render_pdf(pages)


def served_call(url: str):
    import requests

    def call(pdf: bytes) -> list[list[str]]:
        payload = {"file": base64.b64encode(pdf).decode("ascii"), "fileType": 0,
                   "visualize": False}  # fmt: skip
        response = requests.post(url, json=payload, timeout=600)
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        return [res["prunedResult"]["rec_texts"] for res in result["ocrResults"]]

    return call


def bench_paddleocr(pdf_path: Path, seconds: float, cpu_threads: int) -> dict[str, Any]:
    from models.ocr.adapter import default_model_paths

    if not PADDLEOCR_PYTHON.exists():
        raise FileNotFoundError(f"{PADDLEOCR_PYTHON} missing: scripts/setup_paddleocr_bench_venv.sh")
    paths = default_model_paths()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "paddleocr.json"
        command = [
            str(PADDLEOCR_PYTHON), str(RUNNER),
            "--det-model-dir", str(paths["det_model_dir"]),
            "--rec-model-dir", str(paths["rec_model_dir"]),
            "--rec-char-dict-path", str(paths["rec_char_dict_path"]),
            "--pdf", str(pdf_path), "--seconds", str(seconds),
            "--cpu-threads", str(cpu_threads),
            "--timing-module", str(REPO / "bench" / "bench_ocr_inprocess.py"),
            "--out", str(out),
        ]  # fmt: skip
        env = {**os.environ, "HOME": tmp, "PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK": "True"}
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"PaddleOCR reference run failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def _same_pages(a: list[list[str]], b: list[list[str]]) -> tuple[int, int]:
    """(pages whose lines match ignoring spaces, lines that differ)."""
    same, differ = 0, 0
    for page_a, page_b in zip(a, b, strict=True):
        norm_a = [t.replace(" ", "") for t in page_a]
        norm_b = [t.replace(" ", "") for t in page_b]
        same += norm_a == norm_b
        differ += sum(x != y for x, y in zip(norm_a, norm_b, strict=False))
        differ += abs(len(norm_a) - len(norm_b))
    return same, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_pdf.md")
    args = parser.parse_args()

    from support.server import ServerProcess

    pdf = make_pdf()
    common = {"use_cls": False, "pool_size": 1, "cpu_threads": 2}
    labels = {
        "openvino": "(a) served over /ocr, OpenVINO (embedded default runtime)",
        "paddle": "(a') served over /ocr, Paddle Inference",
        "paddleocr": "(b) PaddleOCR 3.x in-process, Paddle Inference",
    }
    rows: dict[str, dict[str, Any]] = {}
    texts: dict[str, list[list[str]]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        pdf_path = tmp_path / "ten_pages.pdf"
        pdf_path.write_bytes(pdf)
        for runtime in ("openvino", "paddle"):
            config = {"models": {"ocr": {"kind": "ocr",
                                         "options": {**common, "runtime": runtime}}}}  # fmt: skip
            with ServerProcess(tmp_path / runtime, config) as server:
                call = served_call(f"{server.http_url}/ocr")
                texts[runtime] = call(pdf)
                rows[runtime] = time_calls(call, [pdf], args.seconds)
                ledger = server.workdir / "data" / "ledger.sqlite3"
                import sqlite3

                with sqlite3.connect(ledger) as conn:
                    billed = conn.execute(
                        "SELECT COUNT(*), SUM(pages), MIN(pages), MAX(pages) FROM usage_records "
                        "WHERE status = 'ok'"
                    ).fetchone()
                rows[runtime]["ledger"] = billed
        reference = bench_paddleocr(pdf_path, args.seconds, 2)
        texts["paddleocr"] = reference.pop("pages")
        rows["paddleocr"] = reference
    for row in rows.values():
        row["pages_per_s"] = round(N_PAGES * row["calls"] / row["wall_s"], 3)
    meta = {
        "PDF": f"{N_PAGES} pages ({N_PAGES // 2} judgement-like CJK, {N_PAGES // 2} invoice), "
        f"{len(pdf)} bytes, 144 dpi",
        "seconds per row": args.seconds,
        "client": "one, sequential (requests.post as in PaddleOCR's serving docs, visualize false)",
        "load": f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    for runtime in ("openvino", "paddle"):
        ratio = rows[runtime]["pages_per_s"] / rows["paddleocr"]["pages_per_s"]
        same, differ = _same_pages(texts[runtime], texts["paddleocr"])
        count, pages, lo, hi = rows[runtime]["ledger"]
        row = labels[runtime].split(" ", 1)[0]
        meta[f"{row} / (b)"] = f"{ratio:.2f}x pages/s"
        meta[f"{row} text vs (b)"] = (
            f"{same}/{N_PAGES} pages identical (spaces ignored), {differ} lines differ"
        )
        meta[f"{row} ledger"] = (
            f"{count} calls (text check, warm-up, timed) billed {pages} pages "
            f"({lo}..{hi} per call)"
        )
    markdown = "\n".join(
        [
            "## PDF: pages/s over PaddleX's /ocr vs PaddleOCR 3.x in-process",
            "",
            "`.venv/bin/python bench/bench_pdf.py` — same PDF, same PP-OCRv4 det/rec files, one "
            "run. Served rows include everything a PaddleOCR 3.x client pays for: HTTP, JSON "
            "and Base64, PDF rendering (pypdfium2), metering and the durable SQLite ledger "
            "write before each answer. The reference reads and renders the PDF itself.",
            "",
            *(f"- {key}: {value}" for key, value in meta.items()),
            "",
            "| pipeline | calls | pages/s | p50 ms / PDF | p95 ms / PDF | mean ms / PDF |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *(
                f"| {labels[key]} | {r['calls']} | {r['pages_per_s']:.2f} | {r['p50_ms']:.0f} "
                f"| {r['p95_ms']:.0f} | {r['mean_ms']:.0f} |"
                for key, r in rows.items()
            ),
            "",
        ]
    )
    args.out.write_text(markdown, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
