"""SQLite ledger: group commit, exactly-once, permissions, migrations, failure policy.

Real SQLite files, real failures: a write lock held by another connection, a per-process
file size limit (RLIMIT_FSIZE, i.e. disk full for that process), an unusable spool dir.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from billing.synthetic import synthetic_record
from exporters.ledger import LedgerWriteError, UsageSink, open_ledger
from exporters.ledger.schema import RAW_COLUMNS, SCHEMA_VERSION, migrate, record_to_row


def _count(path: str) -> int:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0]


def _rollup_total(path: str) -> tuple[int, int]:
    with sqlite3.connect(path) as c:
        return tuple(c.execute(
            "SELECT SUM(requests), SUM(output_tokens) FROM usage_rollup_minute").fetchone())


async def test_concurrent_submits_give_exactly_n_records(tmp_path):
    path = str(tmp_path / "ledger.db")
    sink = open_ledger(path)
    assert isinstance(sink, UsageSink)
    n = 2000
    outcomes = await asyncio.gather(*(sink.submit(synthetic_record(i)) for i in range(n)))
    assert all(o.inserted and not o.spooled for o in outcomes)
    # group commit: far fewer transactions than records
    assert sink.stats.batches < n / 4
    sink.shutdown()
    assert _count(path) == n
    want = sum(synthetic_record(i).output_tokens for i in range(n))
    assert _rollup_total(path) == (n, want)


async def test_same_request_id_three_times_is_one_record(tmp_path):
    path = str(tmp_path / "ledger.db")
    sink = open_ledger(f"sqlite:///{path}")
    rec = synthetic_record(1)
    first = await sink.submit(rec)
    again = await asyncio.gather(sink.submit(rec), sink.submit(rec))
    assert first.inserted and not any(o.inserted for o in again)
    assert sink.stats.duplicates == 2
    sink.shutdown()
    sink.shutdown()  # idempotent
    assert _count(path) == 1
    assert _rollup_total(path)[0] == 1
    with pytest.raises(LedgerWriteError):
        await sink.submit(synthetic_record(2))


def test_write_batch_and_content_is_stored(tmp_path):
    path = str(tmp_path / "ledger.db")
    sink = open_ledger(path)
    rec = synthetic_record(3)
    rec.content = "the recognised text"
    outs = sink.write_batch([rec, synthetic_record(4), rec])
    assert [o.inserted for o in outs] == [True, True, False]
    sink.shutdown()
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT content FROM usage_records WHERE request_id = ?",
                         (rec.request_id,)).fetchone() == ("the recognised text",)


def test_files_are_private_and_wal_with_full_sync(tmp_path):
    path = str(tmp_path / "data" / "ledger.db")
    sink = open_ledger(path)
    sink.write_batch([synthetic_record(0)])
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o700
    for name in os.listdir(tmp_path / "data"):
        if name.startswith("ledger.db"):
            assert stat.S_IMODE(os.stat(tmp_path / "data" / name).st_mode) == 0o600, name
    assert sink._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sink._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    sink.shutdown()


def test_bad_input_is_rejected_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown sqlite ledger option"):
        open_ledger(str(tmp_path / "l.db"), bogus=1)
    with pytest.raises(ValueError, match="unknown ledger URL scheme"):
        open_ledger("mysql://x/y")
    sink = open_ledger(str(tmp_path / "l.db"))
    rec = synthetic_record(0)
    rec.ts = "yesterday"
    with pytest.raises(ValueError, match="ISO-8601"):
        sink.write_batch([rec])
    sink.shutdown()


def test_migrations_upgrade_an_existing_ledger_in_place(tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, "sqlite", up_to=1) == [1]
    # A v1 ledger has v1's columns: no `pages` (added by v8, backfilled as `images`).
    v1_columns = [c for c in RAW_COLUMNS if c != "pages"]
    rows = [dict(zip(RAW_COLUMNS, record_to_row(synthetic_record(i)), strict=True))
            for i in range(10)]
    conn.executemany(f"INSERT INTO usage_records ({', '.join(v1_columns)}) "
                     f"VALUES ({', '.join('?' * len(v1_columns))})",
                     [tuple(r[c] for c in v1_columns) for r in rows])
    conn.close()
    sink = open_ledger(path)  # applies 2 (rollups, backfilled), 3 ... 8 (pages)
    sink.write_batch([synthetic_record(10)])
    sink.shutdown()
    with sqlite3.connect(path) as c:
        versions = [r[0] for r in c.execute("SELECT version FROM schema_migrations ORDER BY 1")]
        assert c.execute("SELECT COUNT(*) FROM usage_records WHERE pages <> images").fetchone() \
            == (0,)
        assert c.execute("SELECT SUM(pages), SUM(images) FROM usage_rollup_minute").fetchone() \
            == c.execute("SELECT SUM(pages), SUM(images) FROM usage_records").fetchone()
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert _rollup_total(path)[0] == 11


def test_several_processes_share_one_ledger(tmp_path):
    path = str(tmp_path / "shared.db")
    script = textwrap.dedent(f"""
        import asyncio, sys
        from billing.synthetic import synthetic_record
        from exporters.ledger import open_ledger
        w = int(sys.argv[1])
        sink = open_ledger({path!r})
        async def main():
            # overlapping ids between workers: each id must land once
            await asyncio.gather(*(sink.submit(synthetic_record(i)) for i in
                                   range(w * 300, w * 300 + 600)))
        asyncio.run(main())
        sink.shutdown()
        print(sink.stats.committed, sink.stats.duplicates, sink.stats.spooled)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)], stdout=subprocess.PIPE,
                              text=True) for w in range(3)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(int(o[0]) for o in outs) == 1200
    assert _count(path) == 1200
    assert _rollup_total(path)[0] == 1200


async def test_locked_database_spools_then_replays_exactly_once(tmp_path):
    path = str(tmp_path / "ledger.db")
    sink = open_ledger(path, busy_timeout_ms=50, retry_interval_s=0.2)
    await sink.submit(synthetic_record(0))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    try:
        outs = await asyncio.gather(*(sink.submit(synthetic_record(i)) for i in range(1, 50)))
        # a retry of an already committed id while down: spooled, deduplicated on replay
        dup = await sink.submit(synthetic_record(0))
        assert all(o.spooled for o in outs) and dup.spooled
        assert sink.stats.spooled == 50 and sink.stats.failed == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sink.force_flush()
    for _ in range(50):
        if sink.stats.spool_pending == 0:
            break
        await asyncio.sleep(0.1)
        await sink.submit(synthetic_record(1000))  # nudges a replay attempt too
    sink.shutdown()
    assert sink.stats.spool_pending == 0
    assert _count(path) == 51  # 0..49 and 1000, nothing doubled
    assert _rollup_total(path)[0] == 51
    spool_dir = tmp_path / "ledger.spool"  # the data dir's spool, not one per URL
    assert spool_dir.is_dir() and [n for n in os.listdir(spool_dir) if n.startswith("spool")] == []


def test_disk_full_spools_and_next_writer_replays(tmp_path):
    """RLIMIT_FSIZE makes the database file unable to grow (EFBIG): a real disk-full."""
    path = str(tmp_path / "ledger.db")
    open_ledger(path).shutdown()  # create the schema without the limit
    limit = os.path.getsize(path) + 256 * 1024
    script = textwrap.dedent(f"""
        import asyncio, resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from billing.synthetic import synthetic_record
        from exporters.ledger import open_ledger
        sink = open_ledger({path!r}, max_batch=50)
        async def main():
            start = 0
            # until the disk is full and 100 records went to the spool (which has the
            # same size limit, so stop well before it fills too)
            while sink.stats.spooled < 100:
                outs = await asyncio.gather(*(sink.submit(synthetic_record(i))
                                              for i in range(start, start + 50)))
                assert all(o.inserted for o in outs)
                start += 50
            return start
        total = asyncio.run(main())
        print(total, sink.stats.committed, sink.stats.spooled, sink.stats.failed)
        import os; os._exit(0)  # die without replaying: the spool stays behind
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    total, committed, spooled, failed = map(int, out.stdout.split())
    assert spooled > 0 and failed == 0 and committed + spooled == total
    assert _count(path) == committed
    sink = open_ledger(path)  # replays the orphaned spool of the dead process
    assert sink.force_flush()
    sink.shutdown()
    assert sink.stats.replayed == spooled
    assert _count(path) == total and _rollup_total(path)[0] == total


async def test_spool_failure_raises_and_counts(tmp_path):
    path = str(tmp_path / "ledger.db")
    (tmp_path / "not_a_dir").write_text("x")
    sink = open_ledger(path, busy_timeout_ms=50, spool_dir=str(tmp_path / "not_a_dir" / "s"))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(LedgerWriteError):
            await sink.submit(synthetic_record(1))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sink.stats.failed == 1 and sink.stats.committed == 0
    sink.shutdown()
    assert _count(path) == 0  # a failed write is never reported as written
