"""Per-tenant idempotency of the ledger (schema v4): replays, conflicts, attempts, bounds.

Every case runs against a real SQLite file and the real local PostgreSQL (a fresh
database per module, tests/support/pg.py); JSONL has its own case. The spool-conflict
case writes the spool file a dead process would leave; the queue-full case holds the
SQLite write lock from a second connection so the writer thread cannot drain meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sqlite3
import stat
from contextlib import nullcontext

import psycopg
import pytest
from support.pg import temporary_database

from billing.cli import main as cli_main
from billing.report import build_report
from billing.synthetic import synthetic_record
from exporters.ledger import LedgerReader, LedgerWriteError, open_ledger
from exporters.ledger.base import BilledRecord
from exporters.ledger.schema import (
    RAW_COLUMNS,
    ROLLUP_KEYS,
    ROLLUP_SUMS,
    SCHEMA_VERSION,
    migrate,
    record_to_row,
    rollup_rows,
)
from exporters.ledger.spool import CONFLICTS_NAME, Spool
from exporters.usage_record import UsageRecord

SHA_A = "a" * 64
SHA_B = "b" * 64


def _rec(request_id: str = "req-1", *, tenant: str = "acme", sha: str | None = SHA_A,
         status: str = "ok", span_id: str | None = "s-ok", tokens: int = 100,
         minute: int = 0) -> UsageRecord:
    ok = status == "ok"
    return UsageRecord(
        request_id=request_id, ts=f"2026-03-01T08:{minute:02d}:00+00:00", duration_ms=5.0,
        tenant=tenant, api_key_id=None, model="ocr", model_version="1", operation="ocr",
        protocol="grpc", endpoint="/x", status=status, output_tokens=tokens if ok else 0,
        billable_tokens=tokens if ok else 0, images=1, span_id=span_id,
        price_id="p1" if ok else None, cost="0.010000" if ok else "0.000000",
        content_sha256=sha,
    )


def _billed(rec: UsageRecord) -> BilledRecord:
    return BilledRecord(rec.content_sha256, rec.input_tokens, rec.output_tokens,
                        rec.billable_tokens, rec.price_id, rec.cost)


class _Db:
    """Row counts and replay counters of one ledger, whatever its kind."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pg = url.startswith("postgresql://")

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.pg:
            with psycopg.connect(self.url) as c:
                return c.execute(sql.replace("?", "%s"), params).fetchall()
        with sqlite3.connect(self.url) as c:
            return c.execute(sql, params).fetchall()

    def rows(self, request_id: str) -> list[tuple]:
        return self.query("SELECT tenant, status, content_sha256, billable_tokens FROM "
                          "usage_records WHERE request_id = ? ORDER BY tenant, status",
                          (request_id,))

    def replays(self, tenant: str, request_id: str) -> int | None:
        got = self.query("SELECT replays FROM request_replays WHERE tenant = ? AND "
                         "request_id = ?", (tenant, request_id))
        return got[0][0] if got else None


@pytest.fixture(scope="module")
def pg_db():
    with temporary_database("pm_idem") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    """(open(**opts) -> sink, _Db) on a fresh SQLite file or a truncated PostgreSQL db."""
    if request.param == "sqlite":
        url = str(tmp_path / "ledger.db")
    else:
        url = request.getfixturevalue("pg_db")
        open_ledger(url, spool_dir=str(tmp_path / "s0")).shutdown()  # migrate
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("TRUNCATE usage_records, usage_rollup_minute, bill_audit, "
                      "request_replays")
    sinks = []

    def open_(**opts):
        opts.setdefault("spool_dir", str(tmp_path / "ledger.spool"))
        sink = open_ledger(url, **opts)
        sinks.append(sink)
        return sink

    yield open_, _Db(url)
    for sink in sinks:
        sink.shutdown()


async def test_same_payload_replayed_is_one_row_and_counted(ledger):
    open_, db = ledger
    sink = open_()
    rec = _rec()
    first = await sink.submit(rec)
    second = await sink.submit(rec)
    third = await sink.submit(rec)
    assert first.inserted and first.existing is None and first.replays == 0
    assert not second.inserted and second.existing == _billed(rec) and second.replays == 1
    assert not third.inserted and third.existing == _billed(rec) and third.replays == 2
    assert db.rows("req-1") == [("acme", "ok", SHA_A, 100)]
    assert db.replays("acme", "req-1") == 2
    assert sink.stats.replays == 2 and sink.stats.duplicates == 2


def test_ledger_status_shows_replays_and_conflicts(ledger, tmp_path, capsys):
    open_, db = ledger
    sink = open_()
    rec = _rec()
    sink.write_batch([rec, rec, _rec(status="INTERNAL", span_id="s-1")])
    sink.shutdown()
    spool_dir = tmp_path / "ledger.spool"
    spool_dir.mkdir(exist_ok=True)
    (spool_dir / CONFLICTS_NAME).write_text("{}\n")
    assert cli_main(["ledger", "status", "--ledger", db.url, "--spool-dir", str(spool_dir)]) == 0
    out = capsys.readouterr().out
    assert "records: 2\n" in out and "billed_records: 1\n" in out
    assert "replayed_requests: 1 (1 replays)" in out and "conflicts: 1\n" in out


async def test_same_id_other_payload_is_refused_with_the_billed_figures(ledger):
    open_, db = ledger
    sink = open_()
    billed = _rec(tokens=100)
    await sink.submit(billed)
    other = await sink.submit(_rec(sha=SHA_B, tokens=999))
    assert not other.inserted and other.replays == 0
    assert other.existing == _billed(billed) and other.existing.content_sha256 == SHA_A
    assert db.rows("req-1") == [("acme", "ok", SHA_A, 100)]
    assert db.replays("acme", "req-1") is None  # a different payload is no replay


async def test_two_tenants_may_use_the_same_request_id(ledger):
    open_, db = ledger
    sink = open_()
    outs = [await sink.submit(_rec(tenant=t, sha=s)) for t, s in (("acme", SHA_A),
                                                                  ("beta", SHA_B))]
    assert all(o.inserted and o.existing is None for o in outs)
    assert db.rows("req-1") == [("acme", "ok", SHA_A, 100), ("beta", "ok", SHA_B, 100)]


async def test_failed_attempt_never_blocks_billing_the_retry(ledger, tmp_path):
    open_, db = ledger
    sink = open_()
    failed = _rec(status="UNAVAILABLE", span_id="s-1")
    assert (await sink.submit(failed)).inserted
    again = await sink.submit(failed)  # the same attempt again (a spool replay, say)
    assert not again.inserted and again.existing is None and again.replays == 0
    assert (await sink.submit(_rec(status="UNAVAILABLE", span_id="s-2"))).inserted
    ok = await sink.submit(_rec(span_id="s-3", minute=1))
    assert ok.inserted and ok.existing is None
    sink.force_flush()
    assert db.rows("req-1") == [("acme", "UNAVAILABLE", SHA_A, 0),
                                ("acme", "UNAVAILABLE", SHA_A, 0), ("acme", "ok", SHA_A, 100)]
    # every attempt is a request; only the ok one is billed, rollups and raw agree
    reader = LedgerReader(db.url)
    for source in ("rollup", "raw"):
        (row,) = build_report(reader, start="2026-03-01", end="2026-03-01", by="tenant",
                              source=source)
        assert (row["requests"], row["errors"], row["billable_tokens"]) == (3, 2, 100)


def test_repeats_within_one_batch(ledger):
    open_, db = ledger
    sink = open_()
    first = _rec("b-1", tokens=10)
    outs = sink.write_batch([first, _rec("b-1", tokens=10), _rec("b-1", sha=SHA_B),
                             _rec("b-1", tokens=10)])
    assert [o.inserted for o in outs] == [True, False, False, False]
    assert [o.existing for o in outs] == [None] + [_billed(first)] * 3
    assert [o.replays for o in outs] == [0, 1, 0, 2]
    assert db.replays("acme", "b-1") == 2
    # a batch whose first ok record is already committed: told the committed figures
    outs = sink.write_batch([_rec("b-1", sha=SHA_B), _rec("b-1", tokens=10)])
    assert [(o.inserted, o.existing, o.replays) for o in outs] == [
        (False, _billed(first), 0), (False, _billed(first), 3)]
    assert db.rows("b-1") == [("acme", "ok", SHA_A, 10)]


async def test_spool_replay_sets_conflicts_aside(ledger, tmp_path, caplog):
    open_, db = ledger
    spool_dir = tmp_path / "ledger.spool"
    sink = open_(spool_dir=str(spool_dir))
    await sink.submit(_rec("c-1"))
    await sink.submit(_rec("c-2"))
    sink.shutdown()
    # what a process that died while the database was down leaves behind: the same
    # payload again (an ordinary dedupe), another payload for a billed id (a conflict),
    # two spooled records of one new id with different payloads (the second conflicts)
    dead = Spool(str(spool_dir))
    dead.append([record_to_row(r) for r in (
        _rec("c-1"), _rec("c-2", sha=SHA_B, tokens=7), _rec("c-3"),
        _rec("c-3", sha=SHA_B, tokens=8))])
    dead.close()
    with caplog.at_level(logging.ERROR, logger="exporters.ledger.group_commit"):
        sink = open_(spool_dir=str(spool_dir))
        assert sink.force_flush()
    health = sink.health()
    assert health.conflicts == 2 and sink.stats.conflicts == 2 and health.spool_pending == 0
    assert any("conflicts.jsonl" in r.getMessage() for r in caplog.records
               if r.levelno == logging.ERROR)
    path = spool_dir / CONFLICTS_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["record"]["request_id"], x["record"]["content_sha256"],
             x["billed"]["content_sha256"]) for x in lines] == [
        ("c-2", SHA_B, SHA_A), ("c-3", SHA_B, SHA_A)]
    assert lines[0]["billed"] == dataclasses.asdict(_billed(_rec("c-2")))
    assert db.rows("c-2") == [("acme", "ok", SHA_A, 100)]
    assert db.rows("c-3") == [("acme", "ok", SHA_A, 100)]
    assert db.replays("acme", "c-1") is None  # a replayed spool line is no client replay
    assert [n for n in os.listdir(spool_dir) if n.startswith("spool-")] == []


async def test_full_writer_queue_refuses_at_once(tmp_path):
    path = str(tmp_path / "ledger.db")
    sink = open_ledger(path, max_pending=3, busy_timeout_ms=60_000)
    await sink.submit(_rec("q-0"))
    assert sink.can_accept() and sink.health().queue_depth == 0
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer thread now waits for the lock
    try:
        tasks = [asyncio.ensure_future(sink.submit(_rec(f"q-{i}"))) for i in range(1, 4)]
        await asyncio.sleep(0)  # let the three submits queue
        assert sink.health().queue_depth == 3
        assert not sink.can_accept() and not sink.health().healthy
        with pytest.raises(LedgerWriteError, match="queue full"):
            await sink.submit(_rec("q-4"))
        with pytest.raises(LedgerWriteError, match="queue full"):
            sink.write_batch([_rec("q-5")])
        assert sink.stats.refused == 2
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    outs = await asyncio.gather(*tasks)
    assert all(o.inserted and not o.spooled for o in outs)
    assert sink.can_accept() and sink.health().queue_depth == 0
    assert (await sink.submit(_rec("q-4"))).inserted
    sink.shutdown()
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0] == 5


def test_max_pending_is_validated_and_taken_by_every_kind(tmp_path):
    with pytest.raises(ValueError, match="max_pending"):
        open_ledger(str(tmp_path / "a.db"), max_pending=0)
    sink = open_ledger(f"jsonl://{tmp_path / 'a.jsonl'}", max_pending=5)
    assert sink.health().queue_depth == 0 and sink.can_accept()
    sink.shutdown()


async def test_jsonl_has_the_same_key(tmp_path):
    path = tmp_path / "usage.jsonl"
    a = open_ledger(f"jsonl://{path}")
    rec = _rec()
    assert (await a.submit(rec)).inserted
    assert (await a.submit(_rec(tenant="beta"))).inserted
    assert (await a.submit(_rec(status="INTERNAL", span_id="s-9"))).inserted
    b = open_ledger(f"jsonl://{path}")  # another process: learns the keys from the file
    same = await b.submit(rec)
    other = await b.submit(_rec(sha=SHA_B, tokens=5))
    assert (same.inserted, same.existing, same.replays) == (False, _billed(rec), 1)
    assert (other.inserted, other.existing, other.replays) == (False, _billed(rec), 0)
    assert not (await b.submit(_rec(status="INTERNAL", span_id="s-9"))).inserted
    a.shutdown()
    b.shutdown()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["tenant"], x["status"]) for x in lines] == [
        ("acme", "ok"), ("beta", "ok"), ("acme", "INTERNAL")]


V8_COLUMNS = frozenset({"pages"})
V3_RAW_COLUMNS = tuple(c for c in RAW_COLUMNS if c not in V8_COLUMNS)


def _make_v3(db: _Db, conn, dialect: str, records: list[UsageRecord]) -> None:
    """A v3 ledger holding ``records``, their rollups and one audit row, as v3 wrote them."""
    assert migrate(conn, dialect, up_to=3) == [1, 2, 3]
    rows = [record_to_row(r) for r in records]
    ph = "%s" if dialect == "postgresql" else "?"
    cur = conn.cursor()
    # v3's tables have no `pages` (v8): rows and rollups as v3 wrote them.
    keep = [i for i, c in enumerate(RAW_COLUMNS) if c not in V8_COLUMNS]
    cur.executemany(f"INSERT INTO usage_records ({', '.join(V3_RAW_COLUMNS)}) "
                    f"VALUES ({', '.join([ph] * len(keep))})",
                    [tuple(row[i] for i in keep) for row in rows])
    roll_cols = (*ROLLUP_KEYS, *ROLLUP_SUMS)
    keep_roll = [i for i, c in enumerate(roll_cols) if c not in V8_COLUMNS]
    cur.executemany(f"INSERT INTO usage_rollup_minute "
                    f"({', '.join(roll_cols[i] for i in keep_roll)}) "
                    f"VALUES ({', '.join([ph] * len(keep_roll))})",
                    [tuple(r[i] for i in keep_roll) for r in rollup_rows(rows)])
    cur.execute(f"INSERT INTO bill_audit (request_id, changed_at, changed_by, old_cost, new_cost)"
                f" VALUES ({ph}, {ph}, {ph}, {ph}, {ph})",
                ("v3-4", "2026-03-02T00:00:00.000000+00:00", "test", "0.1", "0.2"))


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_v3_ledger_upgrades_to_v4_keeping_rows_and_rollups(dialect, tmp_path):
    records = [synthetic_record(i, prefix="v3") for i in range(60)]
    records.reverse()  # rowid order differs from request_id and ts order
    roll_sql = ("SELECT minute, tenant, model, operation, status_class, requests, "
                "billable_tokens, cost_micros FROM usage_rollup_minute ORDER BY 1, 2, 3, 4, 5")
    with temporary_database("pm_v3") if dialect == "postgresql" else nullcontext() as pg_url:
        if dialect == "postgresql":
            url = pg_url
            conn = psycopg.connect(url, autocommit=True)
        else:
            url = str(tmp_path / "v3.db")
            conn = sqlite3.connect(url, isolation_level=None)
        db = _Db(url)
        _make_v3(db, conn, dialect, records)
        conn.close()
        order = "rowid" if dialect == "sqlite" else "request_id"
        v3_cols = ", ".join(V3_RAW_COLUMNS)
        before = db.query(f"SELECT {v3_cols} FROM usage_records ORDER BY {order}")
        rollups = db.query(roll_sql)
        sink = open_ledger(url, spool_dir=str(tmp_path / "spool"))  # applies v4
        assert db.query(f"SELECT {v3_cols} FROM usage_records ORDER BY {order}") == before
        # v8 backfilled pages: every record before PDFs was one image, one page
        assert db.query("SELECT COUNT(*) FROM usage_records WHERE pages <> images") == [(0,)]
        assert db.query(roll_sql) == rollups
        # v4 and every later migration applied
        assert db.query("SELECT MAX(version) FROM schema_migrations") == [(SCHEMA_VERSION,)]
        assert db.query("SELECT tenant, request_id, attempt FROM bill_audit") == [
            (records[-5].tenant, "v3-4", "")]
        if dialect == "sqlite":
            names = {r[0] for r in db.query("SELECT name FROM sqlite_master WHERE "
                                            "type = 'index' AND tbl_name = 'usage_records'")}
            assert {"usage_records_ts", "usage_records_tenant_ts",
                    "usage_records_billing_key"} <= names
        # the upgraded ledger has the per-tenant key: the same id for another tenant is
        # a new record, the same one for the same tenant is not
        same = synthetic_record(3, prefix="v3")
        outs = sink.write_batch([dataclasses.replace(same, tenant="someone-else"), same])
        assert [o.inserted for o in outs] == [True, False]
        assert outs[1].existing == _billed(same)
        sink.shutdown()
        assert db.query("SELECT COUNT(*) FROM usage_records") == [(61,)]
