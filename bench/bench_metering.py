"""What metering costs a gRPC call: same server, same requests, one run, four modes.

Modes (each in a fresh server subprocess, so CPU time is the server's alone):
  none   no interceptor at all: the baseline
  off    our MeteringServerInterceptor with metering disabled (config enabled: false)
  on     metering on: SERVER span, metrics, usage trailers, ledger (OCR only), OTLP export
         to a local rotel-agent collector (tests/support) when available, else none
  stock  opentelemetry-instrumentation-grpc's aio server interceptor alone, exporting its
         spans to the same collector

Calls: ``server_live`` (OIP ServerLive, the cheapest call the server has) and ``ocr``
(Paddle Serving pipeline ``ocr/prediction`` on a small rendered line; loads PP-OCR in each
server, so it takes a while). Reported per mode: throughput, ratio to ``none``, server CPU
microseconds per request (``time.process_time`` deltas read from the server process), and
CPU added over ``none``. The client runs in this process; on a shared 2-core box numbers
are noisy: compare modes within one run only.

    .venv/bin/python bench/bench_metering.py --call server_live --calls 3000
    .venv/bin/python bench/bench_metering.py --call ocr --calls 60 --concurrency 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "off", "on", "stock")


# --- server side (runs in the subprocess) -----------------------------------------------
def _interceptors(mode: str, data_dir: Path) -> tuple[list[Any], Any]:
    """Interceptors for ``mode`` and a shutdown callable."""
    if mode == "none":
        return [], lambda: None
    if mode == "stock":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider()
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return [aio_server_interceptor(tracer_provider=provider)], provider.shutdown

    from exporters.otel import TelemetryConfig, setup_telemetry
    from interceptors import MeteringCore, MeteringServerInterceptor

    if mode == "off":
        core = MeteringCore(None, enabled=False)
        return [MeteringServerInterceptor(core)], lambda: None
    telemetry = setup_telemetry(TelemetryConfig.from_mapping({}))
    ledger = None
    with contextlib.suppress(ImportError):  # the ledger writer may not exist yet
        from exporters.ledger import open_ledger

        ledger = open_ledger(str(data_dir / "ledger.sqlite3"))
    core = MeteringCore(telemetry, ledger=ledger)

    def shutdown() -> None:
        core.close()
        telemetry.shutdown()
        if ledger is not None:
            ledger.shutdown()

    return [MeteringServerInterceptor(core)], shutdown


async def _serve(mode: str, call: str) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from serving import oip_grpc, pipeline
    from serving.model_host import ModelHost
    from serving.proto import pipeline_service_pb2_grpc

    models = {"ocr": {"kind": "ocr", "options": {"cpu_threads": 1, "pool_size": 1}}}
    host = ModelHost(models if call == "ocr" else {}, {"inference_threads": 2})
    await asyncio.to_thread(host.load)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-metering-"))
    interceptors, shutdown = _interceptors(mode, data_dir)
    server = grpc.aio.server(interceptors=interceptors)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        oip_grpc.OipGrpcService(host), server
    )
    pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(
        pipeline.PipelineGrpcService(host), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def control() -> None:  # "cpu" -> CPU seconds so far; "quit" -> stop
        for line in sys.stdin:
            if line.strip() == "cpu":
                print(f"CPU {time.process_time():.6f}", flush=True)
            elif line.strip() == "quit":
                break
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=control, daemon=True).start()
    await done.wait()
    await server.stop(1)
    await asyncio.to_thread(shutdown)
    host.close()


# --- client side ------------------------------------------------------------------------
class _Server:
    def __init__(self, mode: str, call: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", mode, "--call", call],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        )
        self.port = int(self._read("PORT"))

    def _read(self, tag: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return line.split(" ", 1)[1].strip()
        raise RuntimeError(f"bench server exited (rc={self.proc.wait()}) before {tag}")

    def cpu(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("cpu\n")
        self.proc.stdin.flush()
        return float(self._read("CPU"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _request_factory(call: str) -> tuple[str, Any, Any, Any]:
    if call == "server_live":
        from tritonclient.grpc import service_pb2

        return (
            "/inference.GRPCInferenceService/ServerLive",
            service_pb2.ServerLiveRequest(),
            service_pb2.ServerLiveRequest,
            service_pb2.ServerLiveResponse,
        )
    sys.path.insert(0, str(ROOT / "tests"))
    from imaging import render_line

    from serving.proto import pipeline_service_pb2 as pb

    image = base64.b64encode(render_line("metering costs little")).decode()
    request = pb.Request(key=["image"], value=[image], name="ocr", method="prediction")
    return (
        "/baidu.paddle_serving.pipeline_serving.PipelineService/inference",
        request,
        pb.Request,
        pb.Response,
    )


async def _drive(port: int, call: str, calls: int, concurrency: int) -> float:
    import grpc

    method, request, req_type, resp_type = _request_factory(call)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = channel.unary_unary(
            method,
            request_serializer=req_type.SerializeToString,
            response_deserializer=resp_type.FromString,
        )
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await stub(request)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def _collector_env() -> tuple[dict[str, str], Any]:
    """OTEL_* env for a local rotel-agent (tests/support), or ({}, None) without one."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from support.collector import OtlpSink, RotelCollector

        sink = OtlpSink().start()
        agent = RotelCollector(sink.endpoint).start()
    except Exception as exc:  # no rotel: measure with exporter none, and say so
        print(f"no collector ({type(exc).__name__}); metering exports nowhere", file=sys.stderr)
        return {}, None

    def stop() -> None:
        agent.close()
        sink.stop()

    return agent.otel_env("grpc"), stop


def _measure(mode: str, call: str, calls: int, concurrency: int,
             env: dict[str, str]) -> tuple[float, float]:
    """One fresh server: (seconds for ``calls``, server CPU seconds for them)."""
    server = _Server(mode, call, env if mode in ("on", "stock") else {})
    try:
        asyncio.run(_drive(server.port, call, max(calls // 10, 20), concurrency))  # warm-up
        cpu0 = server.cpu()
        seconds = asyncio.run(_drive(server.port, call, calls, concurrency))
        return seconds, server.cpu() - cpu0
    finally:
        server.close()


def run(call: str, calls: int, concurrency: int, modes: list[str],
        repeats: int = 3) -> list[dict[str, Any]]:
    """Modes interleaved ``repeats`` times (noise hits all alike); medians reported."""
    env, stop_collector = _collector_env()
    samples: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    try:
        for _ in range(repeats):
            for mode in modes:
                samples[mode].append(_measure(mode, call, calls, concurrency, env))
    finally:
        if stop_collector is not None:
            stop_collector()
    rows = []
    for mode in modes:
        seconds = statistics.median(s for s, _ in samples[mode])
        cpu = statistics.median(c for _, c in samples[mode])
        rows.append({"mode": mode, "calls": calls, "repeats": repeats, "seconds": seconds,
                     "rps": calls / seconds, "cpu_us_per_call": cpu / calls * 1e6,
                     "exporting": bool(env) and mode in ("on", "stock")})
    base = next((r for r in rows if r["mode"] == "none"), rows[0])
    for row in rows:
        row["throughput_ratio"] = row["rps"] / base["rps"]
        row["added_cpu_us"] = row["cpu_us_per_call"] - base["cpu_us_per_call"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--call", choices=("server_live", "ocr"), default="server_live")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.call))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; known: {list(MODES)}")
    rows = run(args.call, args.calls, args.concurrency, modes, args.repeats)
    print(f"call={args.call} calls={args.calls} concurrency={args.concurrency} "
          f"repeats={args.repeats} (medians)")
    print(f"{'mode':6} {'req/s':>9} {'ratio':>6} {'CPU us/req':>11} {'added us':>9}")
    for r in rows:
        print(
            f"{r['mode']:6} {r['rps']:9.0f} {r['throughput_ratio']:6.3f} "
            f"{r['cpu_us_per_call']:11.1f} {r['added_cpu_us']:9.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
