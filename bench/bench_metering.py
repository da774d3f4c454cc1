"""What metering costs: the REAL ``paddle-meter serve`` process, three modes, one run.

Modes (one server process each, all started up front, measured interleaved per round so
machine noise hits every mode alike):
  off    ``paddle-meter serve`` with ``metering: {enabled: false}``: no interceptor, no
         middleware (serving/metering_setup.py): the baseline
  on     ``paddle-meter serve`` with metering on: SERVER span + stage spans, metrics, usage
         trailers, SQLite ledger (model calls), OTLP/gRPC export to a local rotel-agent
         collector (tests/support/collector.py), Prometheus reader for /metrics
  previous  metering on, served from a git worktree of ``--previous-ref`` (default: the
         last commit before the billing-integrity policy): the added CPU per call of the
         newer code is ``on`` minus ``previous``, measured side by side in this run
  stock  metering off + ``opentelemetry-instrumentation-grpc``'s aio server interceptor,
         exporting its spans to the same collector (bench/serve_stock_otel.py: the same
         PaddleMeterServer with that one interceptor added; product code untouched)

Calls, over gRPC from this process with ``grpc.aio``:
  server_live  OIP ``ServerLive``, the cheapest call the server has
  ocr          Paddle Serving pipeline ``inference`` (``ocr``/``prediction``) on a small
               rendered text line
Reported per mode and call: throughput, ratio to ``off``, server CPU microseconds per
request (utime+stime of the server process from /proc/PID/stat, before/after) and the CPU
added over ``off``. Medians over rounds. Writes docs/bench_metering.md (--out).

    .venv/bin/python bench/bench_metering.py --rounds 5 --live-calls 3000 --ocr-calls 40
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.collector import OtlpSink, RotelCollector  # noqa: E402
from support.server import ServerProcess  # noqa: E402

MODES = ("off", "on", "previous", "stock")
# The last commit before issue 9's policy (idempotency per tenant, fail-closed start,
# header checks, ledger health): ``previous`` mode measures it against the working tree.
PREVIOUS_REF = "1eb7da6"
# Runs ``paddle-meter serve`` from another tree: the editable install's import hook would
# otherwise resolve every project package to this checkout.
_SERVE_FROM_TREE = (
    "import sys; tree = sys.argv.pop(1); "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
    "sys.path.insert(0, tree); "
    "from serving.cli import main; sys.argv[1:1] = ['serve']; sys.exit(main())"
)
CALLS = ("server_live", "ocr")
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
# The bench measures at the OTel SDK's default cadences (a deployed server's), not the
# tests' fast ones: BSP every 5 s, metric export every 10 s (config default).
_OCR_OPTIONS = {"cpu_threads": 1, "pool_size": 1}


class BenchServer(ServerProcess):
    """ServerProcess that can run another launcher than the ``paddle-meter`` script."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, env: dict[str, str],
                 launcher: list[str] | None = None) -> None:
        super().__init__(workdir, config, env=env)
        self.launcher = launcher

    def start(self, timeout_s: float = 240.0) -> BenchServer:
        if self.launcher is None:
            super().start(timeout_s)
            return self
        import httpx
        import yaml

        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*self.launcher, "--config", str(config_path)], cwd=self.workdir, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.logs()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http_url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout_s}s:\n{self.logs()[-4000:]}")

    def cpu_s(self) -> float:
        """utime + stime of the server process (all its threads), in seconds."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) * _TICK_S  # fields 14, 15 of stat(5)


def _previous_tree(root: Path, ref: str) -> Path:
    """A detached git worktree of ``ref`` under ``root`` (removed with ``root``)."""
    tree = root / "previous-tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref],
                   check=True, capture_output=True)
    return tree


def _start_servers(root: Path, otel_env: dict[str, str], modes: list[str],
                   previous_ref: str = PREVIOUS_REF) -> dict[str, Any]:
    models = {"ocr": {"kind": "ocr", "options": _OCR_OPTIONS}}
    servers: dict[str, BenchServer] = {}
    for mode in modes:
        metering_on = mode in ("on", "previous")
        config = {
            "models": models,
            "metering": {"enabled": metering_on},
            "logging": {"level": "WARNING"},
        }
        launcher = ([sys.executable, str(REPO / "bench" / "serve_stock_otel.py")]
                    if mode == "stock" else None)
        if mode == "previous":
            tree = _previous_tree(root, previous_ref)
            launcher = [sys.executable, "-c", _SERVE_FROM_TREE, str(tree)]
        env = otel_env if mode in ("on", "previous", "stock") else {}
        servers[mode] = BenchServer(root / mode, config, env=env, launcher=launcher).start()
    return servers


def _requests() -> dict[str, tuple[str, Any, Any, Any]]:
    from imaging import render_line
    from tritonclient.grpc import service_pb2

    from serving.proto import pipeline_service_pb2 as pb

    image = base64.b64encode(render_line("metering costs little")).decode()
    return {
        "server_live": (
            "/inference.GRPCInferenceService/ServerLive", service_pb2.ServerLiveRequest(),
            service_pb2.ServerLiveRequest, service_pb2.ServerLiveResponse,
        ),
        "ocr": (
            "/baidu.paddle_serving.pipeline_serving.PipelineService/inference",
            pb.Request(key=["image"], value=[image], name="ocr", method="prediction"),
            pb.Request, pb.Response,
        ),
    }


async def _drive(address: str, spec: tuple[str, Any, Any, Any], calls: int,
                 concurrency: int) -> float:
    """Seconds for ``calls`` calls, ``concurrency`` at a time; checks every answer."""
    import grpc

    method, request, req_type, resp_type = spec
    async with grpc.aio.insecure_channel(address) as channel:
        stub = channel.unary_unary(method, request_serializer=req_type.SerializeToString,
                                   response_deserializer=resp_type.FromString)
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                response = await stub(request)
                if getattr(response, "err_no", 0) != 0:
                    raise RuntimeError(f"bench call failed: {response}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def _measure(server: BenchServer, spec: Any, calls: int, concurrency: int) -> tuple[float, float]:
    asyncio.run(_drive(server.grpc_address, spec, max(calls // 10, 4), concurrency))  # warm
    cpu0 = server.cpu_s()
    seconds = asyncio.run(_drive(server.grpc_address, spec, calls, concurrency))
    return seconds, server.cpu_s() - cpu0


def run(rounds: int, calls: dict[str, int], concurrency: dict[str, int],
        modes: list[str], previous_ref: str = PREVIOUS_REF,
        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All servers up, then ``rounds`` rounds of every (call, mode); medians per cell."""
    specs = _requests()
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    info: dict[str, Any] = {"load_before": os.getloadavg()}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        sink = stack.enter_context(OtlpSink())
        collector = stack.enter_context(RotelCollector(sink.endpoint))
        stack.callback(subprocess.run, ["git", "-C", str(REPO), "worktree", "prune"],
                       check=False, capture_output=True)
        servers = _start_servers(Path(tmp), collector.otel_env("grpc"), modes, previous_ref)
        for server in servers.values():
            stack.callback(server.stop)  # idempotent: stop() on an exited process
        for n in range(rounds):
            order = modes[n % len(modes):] + modes[:n % len(modes)]  # no mode always first
            for call in calls:
                for mode in order:
                    samples.setdefault((call, mode), []).append(
                        _measure(servers[mode], specs[call], calls[call], concurrency[call]))
        info["load_after"] = os.getloadavg()
        for server in servers.values():
            server.stop()  # flushes the exporters: every span reaches the collector
        time.sleep(1.0)
        info["spans_at_collector"] = len(sink.spans())
    rows = []
    for call in calls:
        for mode in modes:
            cell = samples[(call, mode)]
            seconds = statistics.median(s for s, _ in cell)
            cpu = statistics.median(c for _, c in cell)
            rows.append({"call": call, "mode": mode, "calls": calls[call],
                         "concurrency": concurrency[call], "rps": calls[call] / seconds,
                         "cpu_us": cpu / calls[call] * 1e6})
        base = next(r for r in rows if r["call"] == call and r["mode"] == modes[0])
        for row in rows:
            if row["call"] == call:
                row["ratio"] = row["rps"] / base["rps"]
                row["added_cpu_us"] = row["cpu_us"] - base["cpu_us"]
    return rows, info


def render(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "| call | mode | calls/round | concurrency | req/s | ratio to off | server CPU us/req "
        "| added CPU us/req |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["mode"] == "previous":
            info.setdefault("policy_cpu", []).append(
                (r["call"], next(o["cpu_us"] for o in rows
                                 if o["call"] == r["call"] and o["mode"] == "on") - r["cpu_us"]))
        lines.append(f"| {r['call']} | {r['mode']} | {r['calls']} | {r['concurrency']} | "
                     f"{r['rps']:.1f} | {r['ratio']:.3f} | {r['cpu_us']:.0f} | "
                     f"{r['added_cpu_us']:+.0f} |")
    load = (f"load average {info['load_before'][0]:.2f} before, "
            f"{info['load_after'][0]:.2f} after")
    return "\n".join([
        f"`.venv/bin/python bench/bench_metering.py --rounds {args.rounds} "
        f"--live-calls {args.live_calls} --ocr-calls {args.ocr_calls}`",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {load}",
        f"- rounds: {args.rounds} (medians), spans received by the collector's sink: "
        f"{info['spans_at_collector']}",
        "",
        *lines,
        *([""] + [f"- CPU added per call by this tree over `{args.previous_ref}` (on - previous), "
                  f"{call}: {delta:+.0f} us/req" for call, delta in info.get("policy_cpu", [])]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--live-calls", type=int, default=3000)
    parser.add_argument("--ocr-calls", type=int, default=40)
    parser.add_argument("--live-concurrency", type=int, default=8)
    parser.add_argument("--ocr-concurrency", type=int, default=2)
    parser.add_argument("--calls", default=",".join(CALLS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--previous-ref", default=PREVIOUS_REF,
                        help="git ref served by the 'previous' mode (metering on)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    wanted = [c.strip() for c in args.calls.split(",") if c.strip()]
    if set(modes) - set(MODES) or set(wanted) - set(CALLS):
        parser.error(f"modes are {list(MODES)}, calls are {list(CALLS)}")
    if modes[0] != "off":
        parser.error("the first mode is the baseline and must be 'off'")
    calls = {c: {"server_live": args.live_calls, "ocr": args.ocr_calls}[c] for c in wanted}
    concurrency = {"server_live": args.live_concurrency, "ocr": args.ocr_concurrency}
    rows, info = run(args.rounds, calls, concurrency, modes, args.previous_ref)
    text = render(rows, info, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
