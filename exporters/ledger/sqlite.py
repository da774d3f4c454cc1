"""SQLite ledger writer: the embedded default.

Durability choice: WAL journal with ``synchronous=FULL``. In WAL mode FULL fsyncs the WAL
at every commit, so a committed record survives power loss; NORMAL would only fsync at
checkpoints (a commit can be lost on power failure, though not on a process crash), which
breaks "durable before the response leaves". Group commit makes FULL cheap: one fsync per
batch. Several worker processes may share one file: every write transaction is
``BEGIN IMMEDIATE`` (takes the write lock up front, so no deadlock-prone lock upgrade)
and waits up to ``busy_timeout_ms`` for the lock.

The database file is created mode 0600 in a 0700 directory; SQLite gives its -wal/-shm
files the database file's mode.
"""

from __future__ import annotations

import datetime as _dt
import os
import sqlite3
from collections.abc import Sequence

from exporters.ledger.base import BilledRecord, WriteOutcome
from exporters.ledger.outcomes import TenantRequest, resolve_outcomes
from exporters.ledger.schema import (
    ATTEMPT_SQL,
    BILLED_COLUMNS,
    RAW_COLUMNS,
    billed_of_db,
    billing_key,
    migrate,
    normalize_ts,
    rollup_from_new_sql,
)
from exporters.ledger.sink import GroupCommitSink
from exporters.ledger.spool import default_spool_dir, ensure_private_dir

__all__ = ["SqliteLedger", "connect_sqlite"]

# No conflict target: the only uniqueness is the billing key (usage_records_billing_key).
_INSERT = (
    f"INSERT INTO usage_records ({', '.join(RAW_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(RAW_COLUMNS))}) ON CONFLICT DO NOTHING"
)
_NEW_KEYS = f"SELECT tenant, request_id, {ATTEMPT_SQL} FROM usage_records WHERE rowid > ?"
_BILLED = (
    f"SELECT {BILLED_COLUMNS} FROM usage_records "
    "WHERE tenant = ? AND request_id = ? AND status = 'ok'"
)
_ADD_REPLAYS = (
    "INSERT INTO request_replays (tenant, request_id, replays, last_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (tenant, request_id) DO UPDATE SET "
    "replays = request_replays.replays + excluded.replays, last_at = excluded.last_at "
    "RETURNING replays"
)
_ROLLUP_FROM_NEW = rollup_from_new_sql()


def connect_sqlite(
    path: str, *, busy_timeout_ms: int = 10_000, synchronous: str = "FULL", create: bool = True
) -> sqlite3.Connection:
    """Open (creating 0600 in a 0700 dir if asked) and migrate; autocommit mode."""
    path = os.path.abspath(path)
    if create:
        ensure_private_dir(os.path.dirname(path))
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    elif not os.path.exists(path):
        raise FileNotFoundError(f"no ledger database at {path}")
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if create:
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn, "sqlite")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


class SqliteLedger(GroupCommitSink):
    """Group-committing SQLite writer; see the module docstring for the durability choice.

    ``spool_dir``: where records go while the database refuses them; a server passes
    ``<data_dir>/ledger.spool`` (the same for every ledger kind). The default is
    :func:`~exporters.ledger.spool.default_spool_dir` (``$PADDLE_METER_DATA_DIR``, else
    the database file's directory, + ``/ledger.spool``).
    """

    def __init__(
        self,
        path: str,
        *,
        spool_dir: str | None = None,
        max_batch: int = 10_000,
        retry_interval_s: float = 1.0,
        busy_timeout_ms: int = 10_000,
        synchronous: str = "FULL",
        max_pending: int = 100_000,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = os.path.abspath(path)
        self.url = f"sqlite:///{self.path}"
        self._conn = connect_sqlite(
            self.path, busy_timeout_ms=busy_timeout_ms, synchronous=synchronous.upper()
        )
        self._cur = self._conn.cursor()
        self._start(
            name="ledger-sqlite",
            spool_dir=spool_dir if spool_dir is not None else default_spool_dir(self.path),
            max_batch=max_batch,
            retry_interval_s=retry_interval_s,
            max_pending=max_pending,
        )

    def _commit(
        self, rows: Sequence[tuple], repeats: Sequence[tuple], count_replays: bool
    ) -> list[WriteOutcome]:
        """One transaction: raw rows (executemany), then the batch's rollups, then COMMIT.

        Which rows were new is learnt without a statement per row: new rows get rowids
        above the pre-insert maximum (no AUTOINCREMENT, and BEGIN IMMEDIATE keeps other
        writers out), so when the change count is short of the batch (retries) the
        inserted billing keys are read back by rowid. The rollups are aggregated by SQLite
        from exactly those rows (GROUP BY over the rowid range) and upserted once per
        bucket, in the same transaction, so they can never disagree with the raw rows.
        Only for ok records not inserted (and ``repeats``) are the billed figures read and
        replays counted (exporters/ledger/outcomes.py), still before COMMIT.
        """
        conn = self._conn
        cur = self._cur
        cur.execute("BEGIN IMMEDIATE")
        try:
            before = cur.execute("SELECT max(rowid) FROM usage_records").fetchone()[0] or 0
            changes = conn.total_changes
            cur.executemany(_INSERT, rows)
            new = conn.total_changes - changes
            if new == len(rows):
                flags = [True] * new
            else:
                got = set(cur.execute(_NEW_KEYS, (before,)))
                flags = [billing_key(row) in got for row in rows]
            if new:
                cur.execute(_ROLLUP_FROM_NEW, (before,))
            outcomes = resolve_outcomes(
                rows,
                flags,
                repeats,
                self._view,
                fetch_existing=self._fetch_billed,
                add_replays=self._add_replays if count_replays else None,
            )
            cur.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (disk full, I/O error).
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    def _fetch_billed(self, keys: list[TenantRequest]) -> dict[TenantRequest, BilledRecord]:
        found = {}
        for key in keys:  # few: only retried ids; each one index lookup
            row = self._cur.execute(_BILLED, key).fetchone()
            if row is not None:
                found[key] = billed_of_db(row)
        return found

    def _add_replays(self, bumps: dict[TenantRequest, int]) -> dict[TenantRequest, int]:
        now = normalize_ts(_dt.datetime.now(_dt.timezone.utc))
        cur = self._cur
        return {
            key: int(cur.execute(_ADD_REPLAYS, (*key, n, now)).fetchall()[0][0])
            for key, n in bumps.items()
        }

    def _close(self) -> None:
        self._conn.close()
