#!/usr/bin/env bash
# Create the virtualenv that holds PaddleX 3.x's OWN serving schema classes, so that the
# /ocr answers are validated against them (tests/tools/paddlex_schema_check.py, run by
# tests/test_paddlex_ocr_pdf.py).
#
# Why a separate venv: paddlex pins numpy < 2.4, PyYAML 6.0.2 and opencv-contrib, and its
# serving package refuses to import unless its whole `serving` extra is installed; none of
# that belongs in the server's venv. No paddlepaddle: the schema modules do not need it.
#
# Idempotent: does nothing when the venv already imports the schema.
# Usage: scripts/setup_paddlex_schema_venv.sh [VENV_DIR]   (default: <repo>/.venv-paddlex-schema)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${repo_root}/.venv-paddlex-schema}"
export PIP_CACHE_DIR="${repo_root}/.cache/pip" PIP_DISABLE_PIP_VERSION_CHECK=1
check_import='from paddlex.inference.serving.schemas import ocr; from paddlex.inference.serving.infra.models import AIStudioResultResponse'

if [[ -x "${venv}/bin/python" ]] && "${venv}/bin/python" -c "${check_import}" >/dev/null 2>&1; then
    echo "paddlex schema venv ready: ${venv}"
    exit 0
fi

"${PYTHON:-python3.11}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet "paddlex[serving]==3.7.2"
"${venv}/bin/python" -c "${check_import}" >/dev/null
echo "paddlex schema venv ready: ${venv}"
