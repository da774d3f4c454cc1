"""The ledger spool never loses a line: quarantine, torn tails, one dir per data dir, health.

Real files and real SQLite lock contention; the cross-kind test uses the local PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import stat
import time

import pytest

from billing.synthetic import synthetic_record
from exporters.ledger import LedgerHealth, ReportsHealth, open_ledger
from exporters.ledger.schema import record_to_row
from exporters.ledger.spool import QUARANTINE_NAME, Spool, default_spool_dir, read_spool_file


def _count(path) -> int:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0]


def _dead_spool(directory, ids, *, extra: bytes = b"") -> str:
    """A spool file as a process that died would leave it: written, unlocked, not replayed."""
    spool = Spool(str(directory))
    spool.append([record_to_row(synthetic_record(i)) for i in ids])
    spool.close()  # releases the lock, keeps the file: pending > 0
    if extra:
        with open(spool.path, "ab") as fh:
            fh.write(extra)
    return spool.path


def _wait(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_malformed_line_is_quarantined_and_the_rest_replayed(tmp_path, caplog):
    spool_dir = tmp_path / "ledger.spool"
    path = _dead_spool(spool_dir, range(3))
    with open(path, "ab") as fh:  # a corrupt line in the middle, then more good records
        fh.write(b'{"request_id": "half-a-rec\n')
        fh.write(b'["not", "a", "record"]\n')
    more = Spool(str(spool_dir))
    with open(path, "ab") as fh:
        for i in range(3, 5):
            fh.write(json.dumps(dict(synthetic_record(i).to_dict())).encode() + b"\n")
    more.close()
    db = str(tmp_path / "ledger.db")
    with caplog.at_level(logging.WARNING):
        sink = open_ledger(db, spool_dir=str(spool_dir))
        assert sink.force_flush()
    health = sink.health()
    sink.shutdown()
    assert _count(db) == 5  # every good record, before and after the bad lines
    assert not os.path.exists(path)  # removed only once its records were committed
    qfile = spool_dir / QUARANTINE_NAME
    assert stat.S_IMODE(os.stat(qfile).st_mode) == 0o600
    quarantined = [json.loads(x) for x in qfile.read_text().splitlines()]
    assert [q["line"] for q in quarantined] == [4, 5]
    assert quarantined[0]["raw"] == '{"request_id": "half-a-rec'
    assert quarantined[0]["source"] == os.path.basename(path)
    assert health.quarantined == 2 and sink.stats.replayed == 5
    assert any(
        r.levelno == logging.ERROR and "quarantined 2" in r.getMessage() for r in caplog.records
    )


def test_only_an_unterminated_last_line_is_torn(tmp_path, caplog):
    spool_dir = tmp_path / "ledger.spool"
    good = json.dumps(synthetic_record(9).to_dict()).encode()
    # the crash cut a write short: a complete-looking record without its newline is torn
    path = _dead_spool(spool_dir, range(2), extra=good)
    contents = read_spool_file(path)
    assert len(contents.rows) == 2 and contents.bad == [] and contents.torn == good
    db = str(tmp_path / "ledger.db")
    with caplog.at_level(logging.WARNING):
        sink = open_ledger(db, spool_dir=str(spool_dir))
        assert sink.force_flush()
        sink.shutdown()
    assert _count(db) == 2
    assert sink.stats.torn_lines == 1 and sink.stats.quarantined == 0
    assert not (spool_dir / QUARANTINE_NAME).exists()
    assert any(
        r.levelno == logging.WARNING and "unterminated" in r.getMessage() for r in caplog.records
    )


def test_nothing_is_removed_while_the_database_refuses_it(tmp_path, caplog):
    spool_dir = tmp_path / "ledger.spool"
    db = str(tmp_path / "ledger.db")
    sink = open_ledger(db, spool_dir=str(spool_dir), busy_timeout_ms=50, retry_interval_s=0.1)
    path = _dead_spool(spool_dir, range(20))  # a worker died meanwhile
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING):
            assert sink.write_batch([synthetic_record(100)])[0].spooled
            assert _wait(lambda: sink.stats.replay_errors >= 2)
        assert os.path.getsize(path) > 0 and len(read_spool_file(path).rows) == 20
        health = sink.health()
        assert health.spool_pending == 21 and not health.database_ok
        assert health.healthy  # records can still be spooled
        assert any(
            r.levelno == logging.WARNING and "spool replay" in r.getMessage()
            for r in caplog.records
        )
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # no traffic needed: the writer retries on its own
    assert _wait(lambda: sink.health().spool_pending == 0)
    sink.shutdown()
    assert _count(db) == 21 and not os.path.exists(path)


async def test_health_is_false_while_neither_database_nor_spool_can_take_a_record(tmp_path):
    db = str(tmp_path / "ledger.db")
    (tmp_path / "blocked").write_text("a file where the spool dir should be")
    sink = open_ledger(
        db, spool_dir=str(tmp_path / "blocked" / "spool"), busy_timeout_ms=50, retry_interval_s=0.1
    )
    assert isinstance(sink, ReportsHealth) and sink.can_accept()
    seen: list[tuple[float, int]] = []
    sink.add_commit_listener(lambda s, n: seen.append((s, n)))
    await sink.submit(synthetic_record(0))
    health = sink.health()
    assert isinstance(health, LedgerHealth)
    assert health.last_commit_latency_s is not None and health.last_commit_latency_s >= 0
    assert seen and seen[-1][1] == 1
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Exception, match="not durable"):
            await sink.submit(synthetic_record(1))
        health = sink.health()
        assert not sink.can_accept() and not health.healthy
        assert health.write_failures == 1 and health.db_errors == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # recovers by itself (a not-ready server gets no traffic to find out)
    for _ in range(100):
        if sink.can_accept():
            break
        await asyncio.sleep(0.05)
    assert sink.can_accept() and sink.health().database_ok
    sink.shutdown()
    assert not sink.can_accept()


def test_default_spool_dir_is_the_data_dirs(tmp_path, monkeypatch):
    monkeypatch.delenv("PADDLE_METER_DATA_DIR", raising=False)
    assert default_spool_dir(str(tmp_path / "ledger.sqlite3")) == str(tmp_path / "ledger.spool")
    monkeypatch.setenv("PADDLE_METER_DATA_DIR", str(tmp_path / "data"))
    assert default_spool_dir(str(tmp_path / "x.db")) == str(tmp_path / "data" / "ledger.spool")
    assert default_spool_dir() == str(tmp_path / "data" / "ledger.spool")
    sink = open_ledger(str(tmp_path / "x.db"))
    assert sink.health().spool_dir == str(tmp_path / "data" / "ledger.spool")
    sink.shutdown()


def test_a_failed_append_never_leaves_a_partial_line(tmp_path):
    spool = Spool(str(tmp_path / "s"))
    spool.append([record_to_row(synthetic_record(0))])
    size = os.path.getsize(spool.path)
    os.close(spool._fd)  # the next write fails (EBADF), as a full disk would
    spool._fd = os.open(spool.path, os.O_RDONLY)
    with pytest.raises(OSError):
        spool.append([record_to_row(synthetic_record(1))])
    assert os.path.getsize(spool.path) == size and spool.pending == 1
    os.close(spool._fd)
    spool._fd = None


def test_a_dead_sqlite_spool_is_replayed_by_a_postgresql_ledger(tmp_path):
    from support.pg import temporary_database

    data = tmp_path / "data"
    spool_dir = data / "ledger.spool"
    _dead_spool(spool_dir, range(7))  # left by a process that wrote to SQLite
    with temporary_database("pm_spool") as url:
        sink = open_ledger(url, spool_dir=str(spool_dir))
        assert sink.force_flush()
        sink.shutdown()
        import psycopg

        with psycopg.connect(url) as c:
            ids = {r[0] for r in c.execute("SELECT request_id FROM usage_records")}
    assert ids == {f"syn-{i}" for i in range(7)}
    assert [n for n in os.listdir(spool_dir) if n.startswith("spool-")] == []
