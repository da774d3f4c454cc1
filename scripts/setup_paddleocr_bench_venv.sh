#!/usr/bin/env bash
# The reference for the OCR benchmarks: PaddleOCR 3.x in its own venv (.venv-bench-paddleocr),
# installed only for `make bench` (bench/_paddleocr_ref/run_paddleocr.py runs it offline on
# our PP-OCRv4 model files). Idempotent: does nothing when paddleocr already imports.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-bench-paddleocr"
export PIP_CACHE_DIR="$ROOT/.cache/pip"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import paddleocr" >/dev/null 2>&1; then
    exit 0
fi
"${PYTHON:-python3.11}" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "paddlepaddle==3.3.1" "paddleocr>=3.0,<4"
