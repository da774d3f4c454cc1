#!/usr/bin/env bash
# Create the PaddleNLP reference venv used by the tokenizer parity test and bench.
#
# The main venv deliberately does not carry paddlenlp (heavy, pins old libraries); the
# reference ErnieTokenizer lives in its own interpreter at .venv-paddlenlp and is driven
# by tests/tools/paddlenlp_ids.py. Idempotent: does nothing when paddlenlp already imports.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PADDLENLP_VENV:-$ROOT/.venv-paddlenlp}"
PY="${PYTHON:-python3.11}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import paddlenlp" >/dev/null 2>&1; then
    echo "paddlenlp venv ready at $VENV"
    exit 0
fi

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip >/dev/null
# paddlenlp 2.8.1 imports huggingface_hub / aistudio_sdk / datasets APIs that later
# releases removed, hence the upper pins.
"$VENV/bin/python" -m pip install \
    "paddlepaddle==3.3.1" \
    "paddlenlp==2.8.1" \
    "huggingface_hub<0.26" \
    "aistudio-sdk==0.2.6" \
    "datasets<3"
"$VENV/bin/python" -c "from paddlenlp.transformers import ErnieTokenizer; print('paddlenlp venv ready')"
