"""What metering costs: the REAL ``paddle-meter serve`` process, three modes, one run.

Modes (one server process each, all started up front, measured interleaved per round so
machine noise hits every mode alike):
  off    ``paddle-meter serve`` with ``metering: {enabled: false}``: no interceptor, no
         middleware (serving/metering_setup.py): the baseline
  on     ``paddle-meter serve`` with metering on: SERVER span + stage spans, metrics, usage
         trailers, SQLite ledger (model calls), OTLP/gRPC export to a local rotel-agent
         collector (tests/support/collector.py), Prometheus reader for /metrics
  keyed  metering on + ``auth: {mode: required}``: every call that needs a key has its
         ``authorization: Bearer KEY`` checked (a ``caller`` key made with ``paddle-meter
         keys create`` before the rounds; HMAC of the key, warm key cache, role check, the
         tenant billed from the key). What a key costs per call is ``keyed`` minus ``on``
         (auth off), measured side by side under the same client load: every mode's client
         sends the same ``authorization`` metadata, which auth off ignores
  previous  metering on, served from a git worktree of ``--previous-ref`` (default: the
         last commit before API keys): the added CPU per call of the newer code with auth
         off is ``on`` minus ``previous``, measured side by side in this run
  stock  metering off + ``opentelemetry-instrumentation-grpc``'s aio server interceptor,
         exporting its spans to the same collector (bench/serve_stock_otel.py: the same
         PaddleMeterServer with that one interceptor added; product code untouched)

Calls, over gRPC from this process with ``grpc.aio``:
  server_live  OIP ``ServerLive``, the cheapest call the server has (open: no key checked)
  server_metadata  OIP ``ServerMetadata``, nearly as cheap, but it needs a valid key when
               auth is required: the call that shows the key check's own cost
  ocr          Paddle Serving pipeline ``inference`` (``ocr``/``prediction``) on a small
               rendered text line
Budgets (bench/budget_check.py, same run): the budget check's CPU and latency per call on
SQLite, PostgreSQL (and Redis, the alternative weighed in docs/design.md), calls/s of 64
concurrent callers through one tenant's budget, and served calls/s of a budgeted tenant vs
an unbudgeted one at 64 concurrent HTTP clients.
Reported per mode and call: throughput, ratio to ``off``, server CPU microseconds per
request (utime+stime of the server process from /proc/PID/stat, before/after) and the CPU
added over ``off``. Medians over rounds; the key's cost is also given as the median of the
per-round differences (keyed - on in the same round). Writes docs/bench_metering.md
(--out); ``.venv/bin/python bench --collect-only`` then gathers docs/BENCHMARKS.md.

    .venv/bin/python bench/bench_metering.py --rounds 5 --live-calls 3000 --ocr-calls 40
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import secrets
import sqlite3
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

MODES = ("off", "on", "keyed", "previous", "stock")
# The last commit before issue 10 (API keys, roles, TLS): ``previous`` mode measures it
# against the working tree with auth off.
PREVIOUS_REF = "99e0f5d"
# The keyed server's tenant and the target for the key check's cost.
KEY_TENANT = "bench"
KEY_TARGET_US = 20.0
# Runs ``paddle-meter serve`` from another tree: the editable install's import hook would
# otherwise resolve every project package to this checkout.
_SERVE_FROM_TREE = (
    "import sys; tree = sys.argv.pop(1); "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
    "sys.path.insert(0, tree); "
    "from serving.cli import main; sys.argv[1:1] = ['serve']; sys.exit(main())"
)
CALLS = ("server_live", "server_metadata", "ocr")
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


def _create_key(server: BenchServer, env: dict[str, str]) -> str:
    """A ``caller`` key for ``server``'s ledger, made by the real CLI (the key on stdout)."""
    exe = Path(sys.executable).with_name("paddle-meter")
    done = subprocess.run(
        [str(exe), "keys", "create", "--tenant", KEY_TENANT, "--role", "caller",
         "--name", "bench"],
        env={**os.environ, **env, "PADDLE_METER_CONFIG": str(server.workdir / "config.yaml")},
        cwd=server.workdir, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"paddle-meter keys create failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _start_servers(root: Path, otel_env: dict[str, str], modes: list[str],
                   previous_ref: str = PREVIOUS_REF) -> tuple[dict[str, Any], str]:
    """Every mode's server, started; and the key every client sends (made for ``keyed``)."""
    models = {"ocr": {"kind": "ocr", "options": _OCR_OPTIONS}}
    servers: dict[str, BenchServer] = {}
    # One secret for the keyed server and the CLI that makes its key (never printed).
    auth_env = {"PADDLE_METER_AUTH_SECRET": secrets.token_hex(32)}
    # Without a keyed server the clients still send a key-shaped header (same load).
    key = f"pmk_{'0' * 12}_{'A' * 43}"
    for mode in modes:
        metering_on = mode in ("on", "keyed", "previous")
        config = {
            "models": models,
            "metering": {"enabled": metering_on},
            "logging": {"level": "WARNING"},
        }
        if mode == "keyed":
            config["auth"] = {"mode": "required"}
        launcher = ([sys.executable, str(REPO / "bench" / "serve_stock_otel.py")]
                    if mode == "stock" else None)
        if mode == "previous":
            tree = _previous_tree(root, previous_ref)
            launcher = [sys.executable, "-c", _SERVE_FROM_TREE, str(tree)]
        env = otel_env if mode in ("on", "keyed", "previous", "stock") else {}
        if mode == "keyed":
            env = {**env, **auth_env}
        servers[mode] = BenchServer(root / mode, config, env=env, launcher=launcher).start()
        if mode == "keyed":
            key = _create_key(servers[mode], auth_env)
    return servers, key


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
        "server_metadata": (
            "/inference.GRPCInferenceService/ServerMetadata", service_pb2.ServerMetadataRequest(),
            service_pb2.ServerMetadataRequest, service_pb2.ServerMetadataResponse,
        ),
        "ocr": (
            "/baidu.paddle_serving.pipeline_serving.PipelineService/inference",
            pb.Request(key=["image"], value=[image], name="ocr", method="prediction"),
            pb.Request, pb.Response,
        ),
    }


async def _drive(address: str, spec: tuple[str, Any, Any, Any], calls: int,
                 concurrency: int, metadata: tuple[tuple[str, str], ...] = ()) -> float:
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
                response = await stub(request, metadata=metadata)
                if getattr(response, "err_no", 0) != 0:
                    raise RuntimeError(f"bench call failed: {response}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def _measure(server: BenchServer, spec: Any, calls: int, concurrency: int,
             metadata: tuple[tuple[str, str], ...]) -> tuple[float, float]:
    warm = max(calls // 10, 4)  # also warms the keyed server's key cache
    asyncio.run(_drive(server.grpc_address, spec, warm, concurrency, metadata))
    cpu0 = server.cpu_s()
    seconds = asyncio.run(_drive(server.grpc_address, spec, calls, concurrency, metadata))
    return seconds, server.cpu_s() - cpu0


def _check_keyed(server: BenchServer, specs: dict[str, Any],
                 metadata: tuple[tuple[str, str], ...]) -> None:
    """The keyed server must refuse ServerMetadata without a key and serve it with one:
    otherwise its numbers would not include a key check at all."""
    import grpc

    spec = specs["server_metadata"]
    try:
        asyncio.run(_drive(server.grpc_address, spec, 1, 1))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise RuntimeError(f"keyed server: a call without a key got {exc.code()}") from exc
    else:
        raise RuntimeError("keyed server served a call without a key: auth is not enforced")
    asyncio.run(_drive(server.grpc_address, spec, 1, 1, metadata))


def _keyed_billing(server: BenchServer) -> tuple[int, int]:
    """(rows billed to the key's tenant, all rows) in the keyed server's SQLite ledger."""
    path = server.workdir / "data" / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        total = conn.execute("SELECT count(*) FROM usage_records").fetchone()[0]
        keyed = conn.execute("SELECT count(*) FROM usage_records WHERE tenant = ?",
                             (KEY_TENANT,)).fetchone()[0]
    return keyed, total


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
        servers, key = _start_servers(Path(tmp), collector.otel_env("grpc"), modes,
                                      previous_ref)
        for server in servers.values():
            stack.callback(server.stop)  # idempotent: stop() on an exited process
        # Every mode's client sends the same metadata: auth off ignores it.
        metadata = (("authorization", f"Bearer {key}"),)
        if "keyed" in servers:
            _check_keyed(servers["keyed"], specs, metadata)
        for n in range(rounds):
            order = modes[n % len(modes):] + modes[:n % len(modes)]  # no mode always first
            for call in calls:
                for mode in order:
                    samples.setdefault((call, mode), []).append(
                        _measure(servers[mode], specs[call], calls[call], concurrency[call],
                                 metadata))
        info["load_after"] = os.getloadavg()
        if "keyed" in servers:
            info["keyed_billing"] = _keyed_billing(servers["keyed"])
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
        if "keyed" in modes and "on" in modes:
            # Rounds interleave the modes, so round n of keyed and of on saw the same noise.
            paired = [(k[1] - o[1]) / calls[call] * 1e6
                      for k, o in zip(samples[(call, "keyed")], samples[(call, "on")],
                                      strict=True)]
            info.setdefault("key_cpu", []).append((call, statistics.median(paired), paired))
    return rows, info


def key_check_in_process(blocks: int = 15, calls: int = 4000) -> dict[str, Any]:
    """The key's own cost, resolved below the served rows' noise: two real MeteringCores in
    this process (same telemetry, no ledger), auth off and auth required (a real KeyStore on
    SQLite, warm KeyCache), each starting and finishing a ServerMetadata-like call (span,
    metrics) with the same ``authorization`` metadata; blocks interleaved, this thread's
    CPU time only (the cache's refresh thread excluded). Returns per-call microseconds."""
    from auth.authenticator import Authenticator
    from auth.cache import KeyCache
    from auth.keys import KeyStore
    from auth.roles import Permission
    from auth.throttle import FailureThrottle
    from exporters.otel import TelemetryConfig, setup_telemetry
    from interceptors import MeteringCore

    secret = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(f"sqlite:///{tmp}/keys.sqlite3", secret)
        _, key = store.create(tenant="bench", role="caller", actor="bench")
        cache = KeyCache(store, ttl_s=5.0, max_stale_s=300.0)
        cache.start()
        authenticator = Authenticator("required", cache=cache, secret=secret,
                                      throttle=FailureThrottle(20, 60.0),
                                      revocation_bound_s=5.0, store=store)
        telemetry = setup_telemetry(TelemetryConfig.from_mapping(
            {"exporter": "none", "prometheus": True}))
        cores = {"on": MeteringCore(telemetry), "keyed": MeteringCore(
            telemetry, authenticator=authenticator)}
        carrier = {"authorization": f"Bearer {key}"}
        method = "/inference.GRPCInferenceService/ServerMetadata"

        async def block(core: Any) -> float:
            began = time.thread_time()
            for _ in range(calls):
                call = core.start_call(protocol="grpc", endpoint=method, span_name=method[1:],
                                       carrier=carrier, attributes={}, operation="metadata",
                                       access=(Permission.AUTHENTICATED, False),
                                       peer="127.0.0.1")
                with call.activate():
                    pass
                await call.finish(ok=True, status="OK")
            return (time.thread_time() - began) / calls * 1e6

        async def measure() -> dict[str, list[float]]:
            for core in cores.values():  # warm-up: caches, attribute sets, code paths
                await block(core)
            out: dict[str, list[float]] = {"on": [], "keyed": []}
            for n in range(blocks):
                for mode in (("on", "keyed") if n % 2 else ("keyed", "on")):
                    out[mode].append(await block(cores[mode]))
            return out

        try:
            per = asyncio.run(measure())
        finally:
            for core in cores.values():
                core.close()
            telemetry.shutdown()
            cache.close()
            store.close()
    diffs = [k - o for k, o in zip(per["keyed"], per["on"], strict=True)]
    return {"blocks": blocks, "calls": calls, "on_us": statistics.median(per["on"]),
            "keyed_us": statistics.median(per["keyed"]), "diffs": diffs,
            "added_us": statistics.median(diffs)}


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
    by = {(r["call"], r["mode"]): r for r in rows}
    key_lines = []
    for call, paired_median, paired in info.get("key_cpu", []):
        checked = call != "server_live"  # ServerLive is open: no key is checked on it
        key_lines.append(
            f"- CPU added per call by an API key (keyed - on, auth required vs off), {call}: "
            f"{by[(call, 'keyed')]['cpu_us'] - by[(call, 'on')]['cpu_us']:+.1f} us/req "
            f"(medians); per-round differences {', '.join(f'{d:+.1f}' for d in paired)}, "
            f"median {paired_median:+.1f} us/req"
            + ("" if checked else " (open call: no key checked, a control)")
        )
    if "keyed_billing" in info:
        keyed, total = info["keyed_billing"]
        key_lines.append(f"- keyed server's ledger: {keyed} of {total} rows billed to the key's "
                         f"tenant `{KEY_TENANT}`")
    summary = []
    check = info.get("key_check")
    if check is not None:
        diffs = check["diffs"]
        key_lines.append(
            f"- the key check in process (two real MeteringCores, auth off vs required, a "
            f"ServerMetadata-like call with span and metrics, {check['blocks']} interleaved "
            f"blocks of {check['calls']} calls, this thread's CPU time): "
            f"{check['on_us']:.1f} vs {check['keyed_us']:.1f} us/call, added "
            f"{check['added_us']:+.1f} us/call (per-block differences "
            f"{min(diffs):+.1f} to {max(diffs):+.1f})")
        control = [d for call, _, paired in info.get("key_cpu", []) if call == "server_live"
                   for d in paired]
        noise = (f"; the served rows cannot resolve it: on the open ServerLive control, where "
                 f"no key is checked, keyed - on per round ran {min(control):+.0f} to "
                 f"{max(control):+.0f} us/req") if control else ""
        verdict = "met" if check["added_us"] < KEY_TARGET_US else "NOT met"
        summary.append(
            f"- target: a key check adds under {KEY_TARGET_US:.0f} us of server CPU per call "
            f"with a warm key cache: {verdict} ({check['added_us']:+.1f} us in process"
            f"{noise})")
    command = (f"`.venv/bin/python bench/bench_metering.py --rounds {args.rounds} "
               f"--live-calls {args.live_calls} --metadata-calls {args.metadata_calls} "
               f"--ocr-calls {args.ocr_calls}"
               + (f" --modes {args.modes}" if args.modes != ",".join(MODES) else "")
               + (f" --calls {args.calls}" if args.calls != ",".join(CALLS) else "")
               + (f" --key-check-blocks {args.key_check_blocks}"
                  if args.key_check_blocks != 15 else "") + "`")
    return "\n".join([
        command,
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {load}",
        f"- rounds: {args.rounds} (medians), spans received by the collector's sink: "
        f"{info['spans_at_collector']}",
        "",
        *lines,
        *([""] + [f"- CPU added per call by this tree over `{args.previous_ref}` (on - previous), "
                  f"{call}: {delta:+.0f} us/req" for call, delta in info.get("policy_cpu", [])]),
        *key_lines,
        *summary,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--live-calls", type=int, default=3000)
    parser.add_argument("--metadata-calls", type=int, default=3000)
    parser.add_argument("--ocr-calls", type=int, default=40)
    parser.add_argument("--live-concurrency", type=int, default=8)
    parser.add_argument("--ocr-concurrency", type=int, default=2)
    parser.add_argument("--key-check-blocks", type=int, default=15)
    parser.add_argument("--key-check-calls", type=int, default=4000)
    parser.add_argument("--budget-blocks", type=int, default=9,
                        help="interleaved blocks of the in-process budget check (0: skip)")
    parser.add_argument("--budget-calls", type=int, default=500)
    parser.add_argument("--budget-served-rounds", type=int, default=5,
                        help="rounds of the served budget throughput (0: skip)")
    parser.add_argument("--budget-served-calls", type=int, default=640)
    parser.add_argument("--budgets-only", action="store_true",
                        help="measure only the budget check (no served metering modes)")
    parser.add_argument("--calls", default=",".join(CALLS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--previous-ref", default=PREVIOUS_REF,
                        help="git ref served by the 'previous' mode (metering on)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_metering.md",
                        help="write the markdown table here (default: docs/bench_metering.md)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    wanted = [c.strip() for c in args.calls.split(",") if c.strip()]
    if set(modes) - set(MODES) or set(wanted) - set(CALLS):
        parser.error(f"modes are {list(MODES)}, calls are {list(CALLS)}")
    if modes[0] != "off":
        parser.error("the first mode is the baseline and must be 'off'")
    counts = {"server_live": args.live_calls, "server_metadata": args.metadata_calls,
              "ocr": args.ocr_calls}
    calls = {c: counts[c] for c in wanted}
    concurrency = {"server_live": args.live_concurrency,
                   "server_metadata": args.live_concurrency, "ocr": args.ocr_concurrency}
    from budget_check import budget_check_in_process, served_budget_throughput
    from budget_check import render as render_budgets

    if args.budgets_only:
        text = "`.venv/bin/python bench/bench_metering.py --budgets-only`"
    else:
        rows, info = run(args.rounds, calls, concurrency, modes, args.previous_ref)
        if "keyed" in modes:
            info["key_check"] = key_check_in_process(args.key_check_blocks,
                                                     args.key_check_calls)
        text = render(rows, info, args)
    check = (budget_check_in_process(args.budget_blocks, args.budget_calls)
             if args.budget_blocks else None)
    served = (served_budget_throughput(args.budget_served_rounds, args.budget_served_calls)
              if args.budget_served_rounds else None)
    text = "\n".join([text, *render_budgets(check, served)])
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
