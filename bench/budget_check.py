"""What a budget check costs, for bench/bench_metering.py (one run, side by side).

In process, per store, with the REAL :class:`billing.budget_guard.BudgetGuard`:
  sqlite      the ledger's SQLite file (WAL, the budget connection synchronous=NORMAL)
  postgresql  the machine's PostgreSQL (127.0.0.1:5432), a throwaway database
  redis       the same reservation as two Lua scripts on the machine's Redis
              (127.0.0.1:6379): the alternative docs/design.md weighs, measured here
              and not used by the product
each call is what a budgeted call adds: ``reserve`` (an exact ERNIE token estimate on a
month budget) before inference and ``settle`` after; blocks of sequential calls, with the
process's CPU time (every thread: the guard's store thread included) and the wall time per
call; then calls/s of 64 concurrent callers through ONE tenant's budget (one counter row,
the worst case for contention).

Served, per ledger (SQLite, PostgreSQL): the real ``paddle-meter serve`` (demo ERNIE,
untrained: only its token counts matter) and 64 concurrent HTTP clients, calls/s of a
tenant under a budget vs a tenant under none, interleaved rounds on the same server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = 64

_RESERVE_LUA = """
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local amount = tonumber(ARGV[1])
if used + reserved + amount > tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
redis.call('SET', KEYS[2], amount, 'EX', tonumber(ARGV[3]))
return 1
"""
_SETTLE_LUA = """
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('DEL', KEYS[2])
redis.call('HINCRBY', KEYS[1], 'reserved', -held)
return redis.call('HINCRBY', KEYS[1], 'used', tonumber(ARGV[1]))
"""


class RedisBudget:
    """The reservation of billing/budget_store.py as Redis Lua scripts (bench only)."""

    def __init__(self) -> None:
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=6379)
        self.client.ping()
        self.counter = f"pm-bench:{uuid.uuid4().hex}"
        self.reserve_script = self.client.register_script(_RESERVE_LUA)
        self.settle_script = self.client.register_script(_SETTLE_LUA)
        self.executor = concurrent.futures.ThreadPoolExecutor(1)

    async def check(self, tokens: int) -> None:
        loop = asyncio.get_running_loop()
        hold = f"{self.counter}:r:{uuid.uuid4().hex}"
        got = await loop.run_in_executor(self.executor, lambda: self.reserve_script(
            keys=[self.counter, hold], args=[tokens, 10**15, 90]))
        assert got == 1
        await loop.run_in_executor(self.executor, lambda: self.settle_script(
            keys=[self.counter, hold], args=[tokens]))

    def close(self) -> None:
        self.client.delete(self.counter)
        self.executor.shutdown()
        self.client.close()


class GuardBudget:
    """A real BudgetGuard on a real store, one month budget of tenant ``bench``."""

    def __init__(self, url: str) -> None:
        from billing.budget_guard import BudgetGuard
        from billing.budget_store import BudgetStore
        from billing.budgets import Budget
        from billing.pricing import PriceBook
        from exporters.usage_record import UsageRecord
        from models.usage import UsageEstimate

        store = BudgetStore(url)
        store.put(Budget("bench", None, "month", "tokens", 10**15))
        self.guard = BudgetGuard(store, timezone="Asia/Shanghai",
                                 pricebook=PriceBook.load(str(REPO / "config" / "pricing.yaml")))
        self.guard.start()
        self.estimate = UsageEstimate(input_tokens=24)
        self.record = UsageRecord(
            request_id="x", ts="", duration_ms=1.0, tenant="bench", api_key_id=None,
            model="ernie", model_version="1", operation="text_classification",
            protocol="http", endpoint="/v2/models/ernie/infer", status="ok",
            input_tokens=24, billable_tokens=24, cost="0.000096")

    async def check(self, tokens: int) -> None:
        reservation = await self.guard.reserve(
            tenant="bench", key_id=None, model="ernie", operation="text_classification",
            started_at=dt.datetime.now(dt.timezone.utc), request_id=uuid.uuid4().hex,
            estimate=self.estimate)
        assert reservation is not None
        await self.guard.settle(reservation, self.record)

    def close(self) -> None:
        self.guard.close()


async def _sequential(target: Any, calls: int) -> tuple[float, float]:
    """(CPU us, wall us) per call of ``calls`` checks one after another."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await target.check(24)
    return ((time.process_time() - cpu0) / calls * 1e6,
            (time.perf_counter() - wall0) / calls * 1e6)


async def _concurrent(target: Any, seconds: float) -> float:
    """Checks per second of CONCURRENCY callers through one budget for ``seconds``."""
    done = 0
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await target.check(24)
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return done / (time.perf_counter() - began)


@contextlib.contextmanager
def _targets(tmp: Path):
    sys.path.insert(0, str(REPO / "tests"))
    from support.pg import temporary_database

    from exporters.ledger import open_ledger

    with contextlib.ExitStack() as stack:
        sqlite_url = str(tmp / "ledger.sqlite3")
        open_ledger(sqlite_url).shutdown()
        pg_url = stack.enter_context(temporary_database("pm_bench_budget"))
        open_ledger(pg_url).shutdown()
        targets = {"sqlite": GuardBudget(sqlite_url), "postgresql": GuardBudget(pg_url),
                   "redis": RedisBudget()}
        try:
            yield targets
        finally:
            for target in targets.values():
                target.close()


def budget_check_in_process(blocks: int = 9, calls: int = 500,
                            throughput_s: float = 4.0) -> dict[str, Any]:
    """Per store: median CPU and wall us per budgeted call, and calls/s at 64 callers."""
    with tempfile.TemporaryDirectory() as tmp, _targets(Path(tmp)) as targets:
        async def measure() -> dict[str, Any]:
            for target in targets.values():  # warm: connections, counters, scripts
                await _sequential(target, 50)
            cells: dict[str, list[tuple[float, float]]] = {k: [] for k in targets}
            for n in range(blocks):
                names = list(targets)
                for name in names[n % len(names):] + names[:n % len(names)]:
                    cells[name].append(await _sequential(targets[name], calls))
            rates = {name: await _concurrent(target, throughput_s)
                     for name, target in targets.items()}
            return {name: {"cpu_us": statistics.median(c for c, _ in cells[name]),
                           "wall_us": statistics.median(w for _, w in cells[name]),
                           "wall_range": (min(w for _, w in cells[name]),
                                          max(w for _, w in cells[name])),
                           "concurrent_rps": rates[name]}
                    for name in targets}

        result = asyncio.run(measure())
    return {"blocks": blocks, "calls": calls, "throughput_s": throughput_s, "stores": result}


def served_budget_throughput(rounds: int = 5, calls: int = 640) -> dict[str, Any]:
    """Per ledger kind: calls/s of 64 concurrent HTTP clients, budgeted tenant vs free."""
    sys.path.insert(0, str(REPO / "tests"))
    import httpx
    from support.pg import temporary_database
    from support.server import ServerProcess

    exe = str(Path(sys.executable).with_name("paddle-meter"))
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        demo = Path(tmp) / "ernie-demo"
        subprocess.run([exe, "models", "make-demo-ernie", str(demo)], check=True,
                       capture_output=True, timeout=600)
        urls = {"sqlite": str(Path(tmp) / "ledger.sqlite3"),
                "postgresql": stack.enter_context(temporary_database("pm_bench_served"))}
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                            "data": ["发票金额 1,234.56 元 invoice total"]}]}
        for kind, url in urls.items():
            config = {
                "models": {"ernie": {"kind": "ernie", "options": {
                    "model_dir": str(demo), "task": "text_classification", "max_seq_len": 64}}},
                "server": {"max_concurrent_http": 256, "max_queued_inferences": 256},
                "ledger": {"url": url},
                "billing": {"timezone": "Asia/Shanghai"},
                "budgets": {"limits": [{"tenant": "budgeted", "period": "month",
                                        "limit_tokens": 10**12}]},
            }
            server = ServerProcess(Path(tmp) / kind, config).start()
            stack.callback(server.stop)

            async def drive(tenant: str, n: int, base: str = server.http_url) -> float:
                async with httpx.AsyncClient(base_url=base, timeout=120,
                                             limits=httpx.Limits(max_connections=CONCURRENCY)
                                             ) as client:
                    remaining = n

                    async def worker() -> None:
                        nonlocal remaining
                        while remaining > 0:
                            remaining -= 1
                            reply = await client.post("/v2/models/ernie/infer", json=body,
                                                      headers={"x-tenant": tenant})
                            assert reply.status_code == 200, reply.text

                    began = time.perf_counter()
                    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
                    return n / (time.perf_counter() - began)

            cells: dict[str, list[float]] = {"free": [], "budgeted": []}
            try:
                asyncio.run(drive("free", calls // 4))  # warm both paths
                asyncio.run(drive("budgeted", calls // 4))
                for n in range(rounds):
                    for tenant in (("free", "budgeted") if n % 2 else ("budgeted", "free")):
                        cells[tenant].append(asyncio.run(drive(tenant, calls)))
            except Exception:
                print(server.logs()[-4000:], file=sys.stderr)
                raise
            server.stop()
            paired = [b / f for b, f in zip(cells["budgeted"], cells["free"], strict=True)]
            out[kind] = {"free_rps": statistics.median(cells["free"]),
                         "budgeted_rps": statistics.median(cells["budgeted"]),
                         "ratios": paired, "ratio": statistics.median(paired)}
    return {"rounds": rounds, "calls": calls, "kinds": out}


def render(check: dict[str, Any] | None, served: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    if check is not None:
        lines += [
            "",
            f"Budget check in process (the real BudgetGuard: reserve before inference + settle "
            f"after, one month budget, {check['blocks']} interleaved blocks of {check['calls']} "
            f"sequential calls; then {CONCURRENCY} concurrent callers through ONE tenant's "
            f"budget for {check['throughput_s']:g} s):",
            "",
            "| store | CPU us/call (all threads) | latency us/call (median) | latency range "
            f"| calls/s at {CONCURRENCY} callers, one budget |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, cell in check["stores"].items():
            label = name + (" (bench only: Lua scripts, not the product)"
                            if name == "redis" else "")
            lo, hi = cell["wall_range"]
            lines.append(f"| {label} | {cell['cpu_us']:.0f} | {cell['wall_us']:.0f} | "
                         f"{lo:.0f}-{hi:.0f} | {cell['concurrent_rps']:.0f} |")
    if served is not None:
        lines += [
            "",
            f"Served: `paddle-meter serve` (demo ERNIE), {CONCURRENCY} concurrent HTTP clients, "
            f"{served['calls']} calls per round, {served['rounds']} interleaved rounds, a "
            "tenant under a month budget vs a tenant under none, same server:",
            "",
            "| ledger | calls/s, no budget | calls/s, budgeted | budgeted / free (median of "
            "rounds) | per-round ratios |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for kind, cell in served["kinds"].items():
            lines.append(f"| {kind} | {cell['free_rps']:.1f} | {cell['budgeted_rps']:.1f} | "
                         f"{cell['ratio']:.3f} | "
                         f"{', '.join(f'{r:.3f}' for r in cell['ratios'])} |")
    return lines
