"""PostgreSQL ledger writer (psycopg 3): same schema, migrations and group commit as SQLite.

Each batch is one transaction; with PostgreSQL's default ``synchronous_commit = on`` the
COMMIT returns only after the WAL is flushed, so a committed record is durable. Raw rows go
in as multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING request_id`` (the returned
ids are the newly inserted ones); rollup upserts are sorted by key so concurrent writer
processes always lock buckets in the same order (no deadlocks). A broken connection is
dropped and reopened on the next batch; meanwhile records go to the spool.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from exporters.ledger.schema import (
    RAW_COLUMNS,
    migrate,
    record_to_row,
    rollup_rows,
    rollup_upsert_sql,
)
from exporters.ledger.sink import GroupCommitSink
from exporters.usage_record import UsageRecord

__all__ = ["PostgresLedger", "connect_postgres"]

_CHUNK = 1000  # rows per INSERT statement: 26 columns x 1000 stays under 65535 parameters
_ROW = "(" + ", ".join(["%s"] * len(RAW_COLUMNS)) + ")"


def connect_postgres(url: str, *, connect_timeout_s: int = 5, create: bool = True
                     ) -> psycopg.Connection:
    """Open an autocommit connection (we issue transactions explicitly) and migrate."""
    conn = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout_s)
    if create:
        migrate(conn, "postgresql")
    return conn


class PostgresLedger(GroupCommitSink):
    """Group-committing PostgreSQL writer."""

    def __init__(
        self,
        url: str,
        *,
        spool_dir: str | None = None,
        max_batch: int = 10_000,
        retry_interval_s: float = 1.0,
        connect_timeout_s: int = 5,
    ) -> None:
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection | None = connect_postgres(
            url, connect_timeout_s=connect_timeout_s)
        self._rollup_sql = rollup_upsert_sql("%s")
        self._start(
            name="ledger-postgres",
            spool_dir=spool_dir if spool_dir is not None else _default_spool_dir(),
            max_batch=max_batch,
            retry_interval_s=retry_interval_s,
        )

    def _commit(self, records: Sequence[UsageRecord]) -> list[bool]:
        rows = [record_to_row(r) for r in records]
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect_postgres(self.url, connect_timeout_s=self._connect_timeout_s,
                                          create=False)
        conn = self._conn
        try:
            inserted: set[str] = set()
            with conn.transaction(), conn.cursor() as cur:
                for start in range(0, len(rows), _CHUNK):
                    chunk = rows[start:start + _CHUNK]
                    cur.execute(
                        f"INSERT INTO usage_records ({', '.join(RAW_COLUMNS)}) VALUES "
                        + ", ".join([_ROW] * len(chunk))
                        + " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
                        [v for row in chunk for v in row],
                    )
                    inserted.update(r[0] for r in cur.fetchall())
                new_rows = [row for row in rows if row[0] in inserted]
                if new_rows:
                    cur.executemany(self._rollup_sql, sorted(rollup_rows(new_rows)))
        except psycopg.Error:
            if conn.broken or conn.closed:
                self._conn = None
            raise
        return [r.request_id in inserted for r in records]

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _default_spool_dir() -> str:
    import os

    base = os.environ.get("PADDLE_METER_DATA_DIR") or os.path.expanduser("~/.paddle-meter")
    return os.path.join(base, "ledger.spool")
