"""Reference row of the PDF bench: PaddleOCR 3.x's own pipeline on a PDF, in-process.

Runs inside ``.venv-bench-paddleocr`` like run_paddleocr.py (whose model directories and
settings it reuses: det+rec on our PP-OCRv4 files, no document orientation, unwarping or
text-line orientation, nothing downloaded). PaddleOCR reads the PDF itself (PaddleX's PDF
reader: pypdfium2 at render scale 2.0, i.e. 144 dpi) and returns one result per page.

Writes one JSON object to ``--out``: the timing dict of ``time_calls`` (one call = the
whole PDF) plus ``pages`` (the rec_texts of each page).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_paddleocr as ref  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--det-model-dir", type=Path, required=True)
    parser.add_argument("--rec-model-dir", type=Path, required=True)
    parser.add_argument("--rec-char-dict-path", type=Path, required=True)
    parser.add_argument("--pdf", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--timing-module", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    args = parser.parse_args()

    spec = importlib.util.spec_from_file_location("bench_timing", args.timing_module)
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ocr = ref.build_paddleocr(root, args)
        path = str(args.pdf)

        def call(_: bytes) -> list[list[str]]:
            # Reading and rendering the PDF is inside the timed call, as it is for us.
            return [list(page["rec_texts"]) for page in ocr.predict(path)]

        pages = call(b"")
        result = timing.time_calls(call, [args.pdf.read_bytes()], args.seconds)
    result["pages"] = pages
    args.out.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
