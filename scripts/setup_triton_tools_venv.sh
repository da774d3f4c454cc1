#!/usr/bin/env bash
# Create the virtualenv that holds the REAL Triton / KServe tools the OIP tests drive.
#
#   - Triton's perf_analyzer: the C++ binary the tritonclient 2.50.0 manylinux wheel ships
#     as bin/perf_analyzer (later wheels no longer carry it). Only the binary is used, so
#     the wheel goes in without its Python dependencies. It links libcudart.so.12 (from
#     PyPI's nvidia-cuda-runtime-cu12, in this venv) and libb64.so.0d (Debian libb64-0d,
#     installed here when missing): tests/support/perf_analyzer.py puts both on its
#     library path.
#   - KServe's Python SDK (kserve: InferenceRESTClient, InferenceGRPCClient), run by
#     tests/tools/kserve_client.py. It pins numpy 2 and pulls kubernetes, so it lives here,
#     not in the main venv.
#
# Idempotent: does nothing when both are in place.
# Usage: scripts/setup_triton_tools_venv.sh [VENV_DIR]   (default: <repo>/.venv-triton-tools)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${repo_root}/.venv-triton-tools}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-${repo_root}/.cache/pip}" PIP_DISABLE_PIP_VERSION_CHECK=1

has_libb64() {
    local found
    found="$(ldconfig -p 2>/dev/null || true)"
    [[ "$found" == *libb64.so.0d* ]]
}
if ! has_libb64; then
    sudo_=""
    [ "$(id -u)" = 0 ] || sudo_=sudo
    $sudo_ apt-get update -q >/dev/null
    $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libb64-0d >/dev/null
fi

check='import kserve, importlib.util, sys; sys.exit(importlib.util.find_spec("nvidia") is None)'
if [[ -x "${venv}/bin/perf_analyzer" && -x "${venv}/bin/python" ]] && "${venv}/bin/python" -c "${check}" 2>/dev/null; then
    echo "triton tools venv ready: ${venv}"
    exit 0
fi

python_="${PYTHON:-}"
for candidate in python3.11 python3.12 python3; do
    [ -n "$python_" ] && break
    command -v "$candidate" >/dev/null 2>&1 && python_="$candidate"
done
"${python_}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet --upgrade pip
"${venv}/bin/python" -m pip install --quiet "kserve>=0.14,<0.22" "nvidia-cuda-runtime-cu12>=12.1,<13"
"${venv}/bin/python" -m pip install --quiet --no-deps "tritonclient==2.50.0"

"${venv}/bin/python" -c "${check}"
test -x "${venv}/bin/perf_analyzer"
echo "triton tools venv ready: ${venv}"
