"""Soak: 64 concurrent clients on all four surfaces for 10 minutes, one kill -9 in the middle.

The real ``paddle-meter serve`` (SQLite ledger in its data dir, or ``--ledger URL``) is
called by ``--clients`` client threads (tests/support/metered_calls.py: LoadClient), each
with its own tenant-scoped ids, cycling through OIP gRPC, OIP HTTP, pipeline gRPC and
pipeline HTTP, every ``--bad-every``-th call a bad one (undecodable image, unknown model,
or its last billed id reused for another image), each call retried with the same id and
payload while the answer is retryable (connection cut, UNAVAILABLE / RESOURCE_EXHAUSTED /
DEADLINE_EXCEEDED, 503 / 504, pipeline err_no 3001 / 6000). Halfway through, the server is
SIGKILLed and started again on the same ports, data dir and ledger; the second run then
serves another half (the outage while it starts is extra).

Afterwards the ledger's billed rows are checked against what the clients were told (0
lost, 0 double-billed, tokens equal, no bad call billed); reported: the server's RSS
(VmRSS of its process tree, sampled every second) growth after the warm-up of each start
(target < 10%), p50/p95 latency of served calls before and after the kill, and every
answer counted by status and call kind.

    .venv/bin/python -m bench soak --minutes 10      (or: .venv/bin/python bench/bench_soak.py)
writes docs/bench_soak.md; exits 1 when the ledger and the clients disagree.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from imaging import render_line  # noqa: E402
from support.metered_calls import (  # noqa: E402
    BAD_KINDS,
    SURFACES,
    Attempt,
    Endpoint,
    LoadClient,
    billed_ok_rows,
    ledger_discrepancies,
)
from support.server import ServerProcess  # noqa: E402

PREFIX = "soak-"
# How each bad call is documented to be answered (docs/design.md), by surface kind.
EXPECTED_BAD = {
    "bad_image": {"http 400", "grpc INVALID_ARGUMENT", "err_no 5000"},
    "unknown_model": {"http 404", "grpc NOT_FOUND", "err_no 3002"},
    "id_conflict": {"http 409", "grpc ALREADY_EXISTS", "err_no 5000"},
}


def _image(n: int, i: int) -> bytes:
    return render_line(f"S{n} NO {i} 金额 {i * 7}.50")


def _tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants (a worker pool would be children), in KiB."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between listing and reading
    return total


class RssSampler(threading.Thread):
    """Samples the current server's RSS every ``interval_s``: ``samples[run]`` = [(t, KiB)]."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval_s = interval_s
        self.samples: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
        self.pid: int | None = None
        self.run_index = 0
        self.done = threading.Event()

    def follow(self, pid: int | None, run_index: int) -> None:
        self.pid, self.run_index = pid, run_index

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            pid, run_index = self.pid, self.run_index
            if pid is not None:
                rss = _tree_rss_kib(pid)
                if rss:
                    self.samples[run_index].append((time.monotonic(), rss))


def _pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.0f}" if values else "-"


def _latency_rows(attempts: list[Attempt], phases: dict[str, tuple[float, float]]) -> list[str]:
    rows = []
    for phase, (lo, hi) in phases.items():
        served = [a for a in attempts if a.kind == "good" and a.outcome.ok and lo <= a.started < hi]
        for surface in ("all", *SURFACES):
            picked = [a.outcome.seconds for a in served if surface in ("all", a.surface)]
            rows.append(
                f"| {phase} | {surface} | {len(picked)} | {_pct(picked, 50)} | {_pct(picked, 95)} |"
            )
    return rows


def _rss_rows(
    samples: dict[int, list[tuple[float, int]]], starts: list[float], warmup_s: float
) -> tuple[list[str], float]:
    rows, worst = [], 0.0
    for run_index, ready in enumerate(starts):
        after = [(t, kib) for t, kib in samples.get(run_index, []) if t >= ready + warmup_s]
        if len(after) < 2:
            rows.append(f"| {run_index + 1} | - | - | - | - | (run shorter than the warm-up) |")
            continue
        base, peak, last = after[0][1], max(k for _, k in after), after[-1][1]
        growth = (peak - base) / base * 100
        worst = max(worst, growth)
        rows.append(
            f"| {run_index + 1} | {base / 1024:.0f} | {peak / 1024:.0f} | {last / 1024:.0f} "
            f"| {growth:+.1f}% | {len(after)} samples over {after[-1][0] - after[0][0]:.0f} s |"
        )
    return rows, worst


def _status_rows(attempts: list[Attempt]) -> list[str]:
    counts = collections.Counter((a.outcome.status, a.kind) for a in attempts)
    kinds = ("good", *BAD_KINDS)
    statuses = sorted({status for status, _ in counts}, key=lambda s: (s != "ok", s))
    return [
        f"| {status} | " + " | ".join(str(counts.get((status, k), 0)) for k in kinds) + " |"
        for status in statuses
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--bad-every", type=int, default=5, help="every k-th call is bad")
    parser.add_argument(
        "--warmup-s", type=float, default=None,
        help="RSS warm-up after each start (default 60; a sixth of the run below 6 minutes)",
    )
    parser.add_argument("--ledger", default=None, help="ledger URL (default: SQLite in data dir)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_soak.md")
    args = parser.parse_args()
    duration_s = args.minutes * 60
    warmup_s = args.warmup_s if args.warmup_s is not None else min(60.0, duration_s / 6)
    load_before = os.getloadavg()
    began_wall = time.time()

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        url = args.ledger or str(workdir / "data" / "ledger.sqlite3")
        config: dict[str, Any] = {"ledger": {"url": url}, "logging": {"level": "WARNING"}}
        sampler = RssSampler(1.0)
        sampler.start()
        server = ServerProcess(workdir, config).start()
        starts = [time.monotonic()]
        sampler.follow(server.proc.pid, 0)
        endpoint = Endpoint(server.http_url, server.grpc_address)
        stop = threading.Event()
        clients = [
            LoadClient(
                n, endpoint, prefix=PREFIX, image=_image, stop=stop,
                surfaces=SURFACES[n % 4:] + SURFACES[: n % 4], tenant=f"soak{n % 8}",
                bad_every=args.bad_every, timeout_s=120,
            )
            for n in range(args.clients)
        ]
        for client in clients:
            client.start()
        try:
            time.sleep(duration_s / 2)
            killed = time.monotonic()
            server.stop(signal.SIGKILL)
            sampler.follow(None, 1)  # nothing to sample until the new server runs
            server = ServerProcess(
                workdir, config, grpc_port=server.grpc_port, http_port=server.http_port
            ).start()
            starts.append(time.monotonic())
            sampler.follow(server.proc.pid, 1)
            # The second run serves as long as the first: the restart's outage is extra.
            time.sleep(duration_s / 2)
            ended = time.monotonic()
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=600)
            for client in clients:
                client.abandon.set()
                client.join(timeout=60)
            sampler.done.set()
        exit_code = server.stop(check=False)
        billed = billed_ok_rows(url, PREFIX)

    attempts = [a for c in clients for a in c.attempts]
    told = {key: tokens for c in clients for key, tokens in c.told.items()}
    unsettled = [key for c in clients for key in c.unsettled]
    errors = [repr(c.error) for c in clients if c.error]
    problems = ledger_discrepancies(told, billed)
    bad_ids = {a.key for a in attempts if a.kind in ("bad_image", "unknown_model")}
    bad_billed = sorted(k for k in problems["unexpected"] if k in bad_ids)
    finals: dict[tuple, Attempt] = {}
    for a in attempts:
        if a.kind in BAD_KINDS:
            finals[(a.kind, a.key, a.started)] = a  # the last attempt of each bad call
    bad_calls = collections.Counter(k[0] for k in finals)
    bad_as_documented = collections.Counter(
        a.kind for a in finals.values() if a.outcome.status in EXPECTED_BAD[a.kind]
    )
    replays = sum(
        1 for a in attempts if a.kind == "good" and a.outcome.ok and a.outcome.replay
    )
    rss_rows, worst_rss = _rss_rows(sampler.samples, starts, warmup_s)
    restart_s = starts[1] - killed
    exact = not any(problems.values()) and not unsettled and not errors

    meta = {
        "clients": f"{args.clients} threads, tenants soak0..soak{min(args.clients, 8) - 1}, "
        f"each cycling {', '.join(SURFACES)}",
        "calls": f"every {args.bad_every}th call bad, cycling {', '.join(BAD_KINDS)}",
        "duration": f"{args.minutes:g} min; kill -9 at {(killed - starts[0]) / 60:.1f} min; "
        f"new server ready {restart_s:.1f} s after the kill; ran {(ended - starts[0]) / 60:.1f} min",
        "ledger": "PostgreSQL" if url.startswith("postgresql://") else "SQLite in the data dir",
        "RSS warm-up": f"first {warmup_s:.0f} s after each start",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load": f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after",
        "server exit after SIGTERM": str(exit_code),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(began_wall)),
    }
    integrity = {
        "good calls served (acknowledged ids)": len(told),
        "billed ok rows for them": sum(len(billed[k]) for k in told if k in billed),
        "lost (told, not billed)": len(problems["lost"]),
        "double-billed": len(problems["doubled"]),
        "billed other tokens than told": len(problems["wrong_tokens"]),
        "billed, never acknowledged": len(problems["unexpected"]),
        "of which bad calls billed": len(bad_billed),
        "good ids never settled": len(unsettled),
        "retries answered as replays": replays,
        "client errors": len(errors),
    }
    phases = {
        "before the kill": (starts[0], killed),
        "after the restart": (starts[1], ended),
    }
    markdown = "\n".join(
        [
            f"## Soak: {args.clients} clients, {args.minutes:g} minutes, one kill -9 in the middle",
            "",
            f"`.venv/bin/python -m bench soak --minutes {args.minutes:g}` (bench/bench_soak.py) — "
            "the real `paddle-meter serve`, real gRPC/HTTP clients on loopback retrying their "
            "own ids; ledger rows compared with what each client was told.",
            "",
            *(f"- {key}: {value}" for key, value in meta.items()),
            "",
            f"Ledger vs clients: **{'exact' if exact else 'MISMATCH'}**",
            "",
            "| check | count |",
            "| --- | ---: |",
            *(f"| {key} | {value} |" for key, value in integrity.items()),
            "",
            "Bad calls answered as documented (last attempt): "
            + ", ".join(
                f"{kind} {bad_as_documented.get(kind, 0)}/{bad_calls.get(kind, 0)}"
                for kind in BAD_KINDS
            ),
            "",
            f"Server RSS after warm-up (MiB; worst growth {worst_rss:+.1f}%, target < 10%):",
            "",
            "| server run | at end of warm-up | peak | at end | growth | |",
            "| ---: | ---: | ---: | ---: | ---: | --- |",
            *rss_rows,
            "",
            "Latency of served good calls (the answering attempt), ms:",
            "",
            "| phase | surface | calls | p50 | p95 |",
            "| --- | --- | ---: | ---: | ---: |",
            *_latency_rows(attempts, phases),
            "",
            "Every attempt by answer and call kind:",
            "",
            "| answer | " + " | ".join(("good", *BAD_KINDS)) + " |",
            "| --- | " + " | ".join("---:" for _ in ("good", *BAD_KINDS)) + " |",
            *_status_rows(attempts),
            "",
        ]
    )
    if errors:
        markdown += "\nClient errors: " + "; ".join(errors[:5]) + "\n"
    args.out.write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
