"""Triton's own perf_analyzer against the served OCR model, over gRPC and HTTP, one run.

The real ``paddle-meter serve`` process (metering on, SQLite ledger, 1 worker) and Triton's
real ``perf_analyzer`` (the binary of the tritonclient 2.50.0 wheel, unchanged, no proxy:
scripts/setup_triton_tools_venv.sh) at concurrency 1, 2 and 4, each protocol in turn, on
the OCR test corpus (its PNGs as the BYTES ``image`` input, one per request in turn).
perf_analyzer reads the server side of each window from our statistics extension; after
the run the statistics' ``inference_count`` is checked against the ledger's ``ok`` rows.

    .venv/bin/python bench/bench_perf_analyzer.py [--window-requests 40] [--concurrency 1,2,4]
writes docs/bench_perf_analyzer.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shlex
import sqlite3
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _ok_rows(workdir: Path) -> int:
    with contextlib.closing(sqlite3.connect(workdir / "data" / "ledger.sqlite3")) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM usage_records WHERE model = 'ocr' AND status = 'ok'"
        ).fetchone()
    return count


def _shown(command: list[str], url: str, data: Path, csv: Path) -> str:
    """The command line as a reader would type it (paths and ports made generic)."""
    words = ["perf_analyzer" if word.endswith("/perf_analyzer") else word for word in command]
    text = shlex.join(words)
    return (
        text.replace(url, "127.0.0.1:PORT")
        .replace(str(data), "ocr_input.json")
        .replace(str(csv), "perf.csv")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # A multiple of the corpus' 4 images: every window holds the same mix of them.
    parser.add_argument("--window-requests", type=int, default=40)
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--stability-percentage", type=int, default=30)
    parser.add_argument("--max-trials", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_perf_analyzer.md")
    args = parser.parse_args()

    from imaging import CORPUS
    from support.perf_analyzer import missing, run_perf_analyzer, write_input_data
    from support.server import ServerProcess

    reason = missing()
    if reason is not None:
        raise SystemExit(reason)
    items = list(CORPUS)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[str] = []
    shown: dict[str, str] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = write_input_data(tmp_path / "input.json", "image", [item.data for item in items])
        workdir = tmp_path / "serve"
        with ServerProcess(workdir, {"models": {"ocr": {"kind": "ocr"}}}) as server:
            urls = {"grpc": server.grpc_address, "http": f"127.0.0.1:{server.http_port}"}
            for protocol, url in urls.items():
                for level in levels:
                    csv = tmp_path / f"{protocol}-{level}.csv"
                    result = run_perf_analyzer(
                        url=url,
                        protocol=protocol,
                        model="ocr",
                        input_data=data,
                        concurrency=str(level),
                        request_count=args.window_requests,
                        max_trials=args.max_trials,
                        stability_percentage=args.stability_percentage,
                        csv_path=csv,
                    )
                    if result.returncode != 0:
                        raise SystemExit(f"perf_analyzer failed:\n{result.output[-4000:]}")
                    print(result.output, flush=True)
                    shown.setdefault(protocol, _shown(result.command, url, data, csv))
                    (row,) = result.rows
                    (sent,) = result.request_counts()
                    (seen,) = result.server_counts()
                    client_us = sum(
                        int(row[k])
                        for k in ("Client Send", "Network+Server Send/Recv", "Client Recv")
                    )
                    rows.append(
                        f"| {protocol} | {level} | {float(row['Inferences/Second']):.2f} "
                        f"| {int(row['p50 latency']) / 1000:.0f} "
                        f"| {int(row['p90 latency']) / 1000:.0f} "
                        f"| {int(row['p99 latency']) / 1000:.0f} "
                        f"| {client_us / 1000:.0f} "
                        f"| {int(row['Server Queue']) / 1000:.1f} "
                        f"| {int(row['Server Compute Infer']) / 1000:.0f} "
                        f"| {(int(row['Server Compute Input']) + int(row['Server Compute Output'])) / 1000:.1f} "
                        f"| {sent} / {seen['inference']} |"
                    )
            runtime = re.findall(r'"runtime": "([^"]+)"', server.logs())
            stats = httpx.get(f"{server.http_url}/v2/models/ocr/stats").json()["model_stats"][0]
            inference_count = stats["inference_count"]
        ledger_ok = _ok_rows(workdir)
    agree = "equal" if inference_count == ledger_ok else "DIFFERENT"
    meta = {
        "images": ", ".join(f"{item.name} ({len(item.data)} B)" for item in items),
        "server": "paddle-meter serve, 1 worker, metering on, SQLite ledger (fsync per group "
        f"commit), OCR runtime {runtime[0] if runtime else 'paddle'} (embedded defaults)",
        "windows": f"count_windows of {args.window_requests} requests (the 4 images in turn), "
        f"stable within {args.stability_percentage} % over 3 windows, at most {args.max_trials} "
        "windows",
        "load": f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "statistics vs ledger after the run": f"inference_count {inference_count}, ok ledger rows "
        f"{ledger_ok}: {agree}",
    }
    markdown = "\n".join(
        [
            "## Triton's perf_analyzer against paddle-meter (OCR, gRPC and HTTP)",
            "",
            "`.venv/bin/python bench/bench_perf_analyzer.py` — Triton's own `perf_analyzer` "
            "(tritonclient 2.50.0 wheel's binary), unchanged and with no proxy, against the "
            "served OCR model; it reads model metadata, the model configuration and, around "
            "every window, the statistics extension. Latencies are perf_analyzer's, in ms; "
            "*client+network* is its send, network and receive time (its latency less the server's), the server columns come "
            "from our statistics (queue: waiting for an inference thread; infer: the model; "
            "in+out: OIP tensor decoding and encoding).",
            "",
            *(f"- {key}: {value}" for key, value in meta.items()),
            "",
            "| protocol | concurrency | infer/s | p50 ms | p90 ms | p99 ms | client+network ms "
            "| server queue ms | server infer ms | server in+out ms | requests (client / server) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            "Command lines (one per concurrency; `ocr_input.json` holds each PNG as base64 of "
            "the BYTES tensor layout, a 4-byte little-endian length then the file):",
            "",
            *(f"- {protocol}: `{command}`" for protocol, command in shown.items()),
            "",
        ]
    )
    args.out.write_text(markdown, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
