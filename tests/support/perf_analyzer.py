"""Run Triton's real ``perf_analyzer`` against a served model, for tests and the bench.

The binary is the one the tritonclient 2.50.0 wheel ships (scripts/setup_triton_tools_venv.sh
puts it in ``.venv-triton-tools``); its CUDA runtime comes from PyPI's
nvidia-cuda-runtime-cu12 in the same venv, libb64 from Debian. It talks to the server
unchanged, as it talks to Triton: server metadata, model metadata, model config, the
statistics extension before and after each measurement window, and ModelInfer / POST infer.

Its ``--input-data`` JSON carries a BYTES tensor as base64 of the raw tensor layout (each
element a 4-byte little-endian length, then its bytes).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import glob
import json
import os
import re
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PERF_ANALYZER", "PerfResult", "missing", "run_perf_analyzer", "write_input_data"]

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-triton-tools"
PERF_ANALYZER = VENV / "bin" / "perf_analyzer"


def _library_path() -> str:
    dirs = glob.glob(
        str(VENV / "lib" / "python3*" / "site-packages" / "nvidia" / "cuda_runtime" / "lib")
    )
    existing = os.environ.get("LD_LIBRARY_PATH")
    return os.pathsep.join([*dirs, *([existing] if existing else [])])


def missing() -> str | None:
    """Why perf_analyzer cannot run here (None: it can)."""
    if not PERF_ANALYZER.exists():
        return f"{PERF_ANALYZER} is missing: run scripts/setup_triton_tools_venv.sh"
    probe = subprocess.run(
        [str(PERF_ANALYZER), "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "LD_LIBRARY_PATH": _library_path()},
        timeout=60,
    )
    if "error while loading shared libraries" in probe.stderr:
        return probe.stderr.strip()
    return None


def bytes_element(data: bytes) -> bytes:
    """One BYTES tensor element in the raw layout: 4-byte little-endian length + bytes."""
    return struct.pack("<I", len(data)) + data


def write_input_data(path: Path, input_name: str, files: Sequence[bytes]) -> Path:
    """perf_analyzer ``--input-data`` with one request per file: input ``input_name`` a
    BYTES tensor of shape [1] holding the file."""
    steps = [
        {
            input_name: {
                "content": {"b64": base64.b64encode(bytes_element(data)).decode("ascii")},
                "shape": [1],
            }
        }
        for data in files
    ]
    path.write_text(json.dumps({"data": steps}), encoding="utf-8")
    return path


@dataclasses.dataclass
class PerfResult:
    """What one perf_analyzer run printed, per concurrency."""

    returncode: int
    output: str
    #: one row per concurrency from its CSV (-f): the column names as perf_analyzer writes them
    rows: list[dict[str, str]]
    #: the command line it ran
    command: list[str]

    def request_counts(self) -> list[int]:
        """The client's ``Request count`` of each concurrency's measurement."""
        return [int(n) for n in re.findall(r"Request count: (\d+)", self.output)]

    def server_counts(self) -> list[dict[str, int]]:
        """The server-side counts perf_analyzer read from our statistics extension."""
        found = re.findall(
            r"Inference count: (\d+)\s+Execution count: (\d+)\s+Successful request count: (\d+)",
            self.output,
        )
        return [{"inference": int(i), "execution": int(e), "success": int(s)} for i, e, s in found]

    def throughputs(self) -> list[float]:
        """infer/sec of each concurrency (CSV ``Inferences/Second``)."""
        return [float(row["Inferences/Second"]) for row in self.rows]


def run_perf_analyzer(
    *,
    url: str,
    protocol: str,
    model: str,
    input_data: Path,
    concurrency: str = "1",
    request_count: int = 5,
    window_ms: int | None = None,
    max_trials: int = 3,
    stability_percentage: int = 1000,
    csv_path: Path,
    extra: Sequence[str] = (),
    timeout_s: float = 600,
) -> PerfResult:
    """perf_analyzer at ``concurrency`` (``start[:end[:step]]``) in ``count_windows`` mode
    (each window ``request_count`` requests, so a run's length does not depend on the
    machine's speed), or with ``window_ms`` in ``time_windows`` mode (windows of that many
    ms). ``stability_percentage`` is generous by default: the test asks whether it runs,
    the bench passes its own."""
    if window_ms is None:
        windows = [
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            str(request_count),
        ]
    else:
        windows = ["--measurement-mode", "time_windows", "--measurement-interval", str(window_ms)]
    command = [
        str(PERF_ANALYZER),
        "-m",
        model,
        "-u",
        url,
        "-i",
        protocol,
        "--input-data",
        str(input_data),
        "--concurrency-range",
        concurrency,
        *windows,
        "--max-trials",
        str(max_trials),
        "--stability-percentage",
        str(stability_percentage),
        "-f",
        str(csv_path),
        *extra,
    ]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "LD_LIBRARY_PATH": _library_path()},
        timeout=timeout_s,
    )
    rows: list[dict[str, str]] = []
    if csv_path.exists():
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    return PerfResult(proc.returncode, proc.stdout + proc.stderr, rows, command)
