#!/usr/bin/env bash
# Create the Python 3.9 virtualenv that holds the REAL Paddle Serving 0.9 client.
#
# Why a second venv: paddle-serving-{server,client}==0.9.0 only install on
# Python <= 3.9 and pin protobuf 3.x / grpcio 1.33, which cannot live next to the
# main venv's protobuf 6.x. Tests run tests/tools/ps_pipeline_client.py with this
# venv's python to prove wire compatibility against the genuine PipelineClient.
#
# Idempotent: does nothing when the venv already imports PipelineClient.
# Usage: scripts/setup_ps_client_venv.sh [VENV_DIR]   (default: <repo>/.venv-ps39)
# Env:   PS39_PYTHON  interpreter to build the venv from
#                     (default /root/.pyenv/versions/3.9.18/bin/python)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${repo_root}/.venv-ps39}"
base_python="${PS39_PYTHON:-/root/.pyenv/versions/3.9.18/bin/python}"

# The import the client script uses. It does NOT fetch Paddle Serving's C++
# server binary (only Server.run_server()/download_bin() does that), but its
# pipeline logger creates ./PipelineServingLogs at import time unless
# SERVING_LOG_PATH points elsewhere, so the checks run with a scratch one.
check_import='from paddle_serving_server.pipeline import PipelineClient'
export SERVING_LOG_PATH="${TMPDIR:-/tmp}/ps_pipeline_client"

if [[ -x "${venv}/bin/python" ]] && "${venv}/bin/python" -c "${check_import}" 2>/dev/null; then
    echo "ps39 venv ready: ${venv}"
    exit 0
fi

if [[ ! -x "${base_python}" ]]; then
    echo "error: Python 3.9 interpreter not found at ${base_python} (set PS39_PYTHON)" >&2
    exit 1
fi

"${base_python}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet --upgrade "pip<25"
"${venv}/bin/python" -m pip install --quiet \
    "paddle-serving-server==0.9.0" "paddle-serving-client==0.9.0"

"${venv}/bin/python" -c "${check_import}"
echo "ps39 venv ready: ${venv}"
