"""Ledger benchmark: durable write rate (group commit vs one commit per record) and a
monthly report from rollups vs raw rows vs pandas over a JSONL file of the same records.

    python bench/bench_ledger.py [--records 10000000] [--durable 50000] [--pg URL]

Writes docs/bench_ledger.md. Targets: >= 20,000 durable records/s into SQLite; rollup
report >= 50x faster than pandas over JSONL. Data goes to a temporary directory.

What is timed where:
  * durable rate: ``--concurrency`` submitter tasks on one event loop, each awaiting
    ``sink.submit(record)`` for its share of ``--durable`` records (each await returns only
    after COMMIT + fsync). Records are built before the clock starts: building them is
    the metering core's cost, not the ledger's.
  * loading the big ledger is NOT the durable benchmark: rows come from
    ``synthetic_rows`` and go in through ``sink.write_rows`` in batches of 200,000 (the
    same commit, rollups and fsync, one transaction per batch), while a second process
    writes the JSONL file of the same records.
  * pandas: ``read_json(lines=True, chunksize=500_000)`` aggregated per chunk, then the
    per-chunk sums summed: at 10M lines (~6 GB) a whole-file read_json does not fit in
    24 GiB, so this is the fair "simple script".
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from billing.report import build_report  # noqa: E402
from billing.synthetic import jsonl_line, synthetic_record, synthetic_rows  # noqa: E402
from exporters.ledger import LedgerReader, open_ledger  # noqa: E402

_LOAD_BATCH = 200_000

NOTES = """## Where the durable write rate comes from

Once group commit shares the fsync, the cost is per-record Python work and per-record
asyncio plumbing, so the submit path (exporters/ledger/sink.py, group_commit.py) does:

* `submit` validates the record and converts it to its ledger row tuple once, on the
  submitting side (one C `attrgetter` over the columns, `fromisoformat` + `isoformat` for
  the timestamp, integer micro-units for the cost); the writer thread only binds tuples.
* the submitter awaits a plain loop future (no `concurrent.futures.Future` +
  `asyncio.wrap_future` pair per record); after each commit the writer thread settles all
  futures of one event loop with a single `loop.call_soon_threadsafe` per batch.
* SQLite: one `executemany` of the batch under `BEGIN IMMEDIATE`; which rows were new is
  known from the change count (and, only when a retried id made it short, from the rows
  above the pre-insert max rowid); the minute rollups of exactly those rows are aggregated
  by SQLite and upserted once per bucket in the same transaction, then COMMIT (WAL,
  synchronous=FULL: fsync'd).
* PostgreSQL: the batch is streamed with `COPY` into a session temp table, then one
  statement inserts the new rows (`ON CONFLICT DO NOTHING RETURNING`) and upserts their
  rollups (buckets in key order), then COMMIT (synchronous_commit=on).

## Rollups and traffic density

Reports read the per-minute rollup table, so they are as fast as the number of rollup
rows allows. At 0.25 s between records (10M records in 29 days, about 4 requests/s) a
rollup row stands for 20 records. With sparse traffic the gain shrinks: one record every
3 s (20 a minute, spread over up to 20 tenant/model/operation/status buckets) gives about
2 records per rollup row. Measured separately with `--records 1000000 --step-s 3 --pg ''`
(load average 1.9-2.8): rollups 1.46 s, raw rows 3.00 s, pandas 26.7 s, i.e. 18x, short
of the 50x target; meeting it for such traffic would need coarser (hourly or daily)
rollups, which reprice (billing/reprice.py) would then also have to adjust.
"""


async def _submit_all(sink, records: list, concurrency: int) -> float:
    async def submitter(k: int) -> None:
        submit = sink.submit
        for rec in records[k::concurrency]:
            await submit(rec)

    t0 = time.perf_counter()
    await asyncio.gather(*(submitter(k) for k in range(concurrency)))
    return len(records) / (time.perf_counter() - t0)


def durable_rate(url: str, n: int, *, max_batch: int, concurrency: int, **opts) -> float:
    prefix = uuid.uuid4().hex[:6]
    records = [synthetic_record(i, prefix=prefix) for i in range(n)]
    sink = open_ledger(url, max_batch=max_batch, **opts)
    try:
        rate = asyncio.run(_submit_all(sink, records, concurrency))
        assert sink.stats.committed == n and sink.stats.spooled == 0, sink.stats
        return rate
    finally:
        sink.shutdown()


def _write_jsonl(jsonl: str, n: int, step_s: float) -> None:
    with open(jsonl, "w") as fh:
        for start in range(0, n, _LOAD_BATCH):
            fh.writelines(map(jsonl_line, synthetic_rows(
                start, min(n, start + _LOAD_BATCH), step_s=step_s)))


def fill(path: str, jsonl: str, n: int, step_s: float) -> tuple[float, float]:
    """n synthetic records into the SQLite ledger and (in parallel) a JSONL file.

    Returns (seconds for the ledger load, seconds until both were written).
    """
    writer = multiprocessing.get_context("fork").Process(target=_write_jsonl,
                                                         args=(jsonl, n, step_s))
    t0 = time.perf_counter()
    writer.start()
    sink = open_ledger(path, max_batch=_LOAD_BATCH)
    for start in range(0, n, _LOAD_BATCH):
        sink.write_rows(synthetic_rows(start, min(n, start + _LOAD_BATCH), step_s=step_s))
    sink.shutdown()
    t_db = time.perf_counter() - t0
    writer.join()
    if writer.exitcode != 0:
        raise RuntimeError(f"JSONL writer failed ({writer.exitcode})")
    return t_db, time.perf_counter() - t0


def pandas_month(jsonl: str) -> tuple[float, dict]:
    import pandas as pd

    t0 = time.perf_counter()
    parts = []
    # chunked so 10M lines fit in memory; the per-chunk sums are then summed again
    for df in pd.read_json(jsonl, lines=True, chunksize=500_000, dtype=False):
        df["month"] = df["timestamp"].str.slice(0, 7)
        parts.append(
            df.groupby(["month", "tenant", "model"]).agg(
                requests=("request_id", "count"), tokens=("token_count", "sum")
            )
        )
    total = pd.concat(parts).groupby(level=[0, 1, 2]).sum()
    return time.perf_counter() - t0, {k: int(v) for k, v in total["requests"].items()}


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--durable", type=int, default=50_000)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--step-s", type=float, default=0.25,
                    help="seconds between synthetic records (0.25: 10M records = 29 days)")
    ap.add_argument(
        "--pg",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="admin URL; a scratch database is created and dropped ('' to skip)",
    )
    ap.add_argument("--tmp", default=None, help="directory for the data (default: a temp dir)")
    ap.add_argument("--out", default="docs/bench_ledger.md")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_ledger_", dir=args.tmp)
    t_start, load_start = time.perf_counter(), _load()
    rows_md = []
    single_n = max(500, args.durable // 25)
    kw_sqlite = dict(concurrency=args.concurrency)
    grp = durable_rate(os.path.join(tmp, "d1.db"), args.durable, max_batch=10_000, **kw_sqlite)
    one = durable_rate(os.path.join(tmp, "d2.db"), single_n, max_batch=1, **kw_sqlite)
    rows_md.append(f"| SQLite (WAL, synchronous=FULL) | {grp:,.0f} | {one:,.0f} "
                   f"| {grp / one:.1f}x |")
    print(rows_md[-1], flush=True)
    if args.pg:
        import psycopg

        name = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = args.pg.rsplit("/", 1)[0] + "/" + name
        try:
            spool = os.path.join(tmp, "spool")
            grp = durable_rate(url, args.durable, max_batch=10_000, spool_dir=spool, **kw_sqlite)
            one = durable_rate(url, single_n, max_batch=1, spool_dir=spool, **kw_sqlite)
            rows_md.append(f"| PostgreSQL (synchronous_commit=on) | {grp:,.0f} | {one:,.0f} "
                           f"| {grp / one:.1f}x |")
            print(rows_md[-1], flush=True)
        finally:
            with psycopg.connect(args.pg, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    path, jsonl = os.path.join(tmp, "big.db"), os.path.join(tmp, "big.jsonl")
    t_db, t_fill = fill(path, jsonl, args.records, args.step_s)
    days = args.records * args.step_s / 86400
    sizes = os.path.getsize(path) / 2**30, os.path.getsize(jsonl) / 2**30
    print(f"filled {args.records} records ({days:.0f} days): ledger {t_db:.1f}s, "
          f"both {t_fill:.1f}s; {sizes[0]:.2f} GiB db, {sizes[1]:.2f} GiB jsonl", flush=True)
    reader = LedgerReader(path)
    n_roll = reader.fetch_all("SELECT COUNT(*) FROM usage_rollup_minute")[0][0]
    kw = dict(start="2026-01-01", end="2027-12-31", period="month", by="tenant,model")
    t_roll, roll = timed(lambda: build_report(reader, source="rollup", **kw))
    print(f"rollup report {t_roll:.3f}s", flush=True)
    t_raw, raw = timed(lambda: build_report(reader, source="raw", **kw), repeat=1)
    print(f"raw report {t_raw:.3f}s", flush=True)
    assert roll == raw, "rollup and raw reports differ"
    t_pd, pd_counts = pandas_month(jsonl)
    print(f"pandas {t_pd:.3f}s", flush=True)
    assert sum(pd_counts.values()) == sum(r["requests"] for r in roll) == args.records
    pd_by_key = {(m, t, mo): c for (m, t, mo), c in pd_counts.items()}
    assert pd_by_key == {(str(r["period"])[:7], r["tenant"], r["model"]): r["requests"]
                         for r in roll}, "pandas and ledger reports differ"
    total_s = time.perf_counter() - t_start
    cmd = (f"python bench/bench_ledger.py --records {args.records} --durable {args.durable} "
           f"--concurrency {args.concurrency} --step-s {args.step_s:g}" + ("" if args.pg else " --pg ''"))
    lines = [
        "# Ledger benchmark",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other "
        f"engineers' jobs), Python {platform.python_version()}. Load average (1, 5, 15 min) "
        f"at start: {load_start}; at end: {_load()}. Whole run: {total_s / 60:.1f} min.",
        "",
        f"Command: `{cmd}`",
        "",
        f"## Durable records/s ({args.concurrency} concurrent submitters; each "
        "`await sink.submit(record)` returns after COMMIT + fsync)",
        "",
        f"Group commit: {args.durable:,} records, batches of up to 10,000. One commit per "
        f"record (`max_batch=1`): {single_n:,} records. Records are built before the clock "
        "starts.",
        "",
        "| ledger | group commit | one commit per record | speed-up |",
        "| --- | ---: | ---: | ---: |",
        *rows_md,
        "",
        f"## Monthly report (by tenant, model) over {args.records:,} records "
        f"({days:.1f} days, one every {args.step_s:g} s)",
        "",
        f"The records fill {n_roll:,} per-minute rollup rows ({args.records / n_roll:.1f} "
        "records per row). The rollup report's speed follows that ratio: reports scan "
        "rollup rows, so sparse traffic (a few requests per minute spread over many "
        "tenant/model buckets) gains little over raw rows; see the note below.",
        "",
        "| source | seconds | vs pandas |",
        "| --- | ---: | ---: |",
        f"| rollups (per-minute aggregates), best of 3 | {t_roll:.3f} | "
        f"{t_pd / t_roll:.0f}x faster |",
        f"| raw rows (SQL GROUP BY), 1 run | {t_raw:.3f} | {t_pd / t_raw:.1f}x faster |",
        f"| pandas read_json(lines=True, chunksize=500,000) over JSONL, 1 run | "
        f"{t_pd:.3f} | 1x |",
        "",
        "Pandas reads the JSONL file in chunks of 500,000 lines, groups each chunk by "
        "(month, tenant, model) and sums the per-chunk results: a whole-file read of the "
        f"{sizes[1]:.1f} GiB file into one DataFrame of 29 mostly-object columns would not "
        "fit in this machine's 24 GiB (estimated, not attempted).",
        "",
        f"Loading (not the durable benchmark): {args.records:,} rows through "
        f"`sink.write_rows` in transactions of {_LOAD_BATCH:,} (same schema, rollups and "
        f"fsync) took {t_db:.1f} s ({args.records / t_db:,.0f} rows/s) while another "
        f"process wrote the JSONL file; both done after {t_fill:.1f} s. Ledger file "
        f"{sizes[0]:.2f} GiB, JSONL {sizes[1]:.2f} GiB. Rollup and raw "
        "reports were checked equal, and pandas' request counts per (month, tenant, model) "
        "equal the ledger's.",
        "",
        NOTES,
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
