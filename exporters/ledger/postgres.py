"""PostgreSQL ledger writer (psycopg 3): same schema, migrations and group commit as SQLite.

Each batch is one transaction; with PostgreSQL's default ``synchronous_commit = on`` the
COMMIT returns only after the WAL is flushed, so a committed record is durable. Rows are
streamed with ``COPY`` into a session temp table, then one statement moves them with
``INSERT ... ON CONFLICT DO NOTHING RETURNING`` (the returned billing keys are the newly
inserted ones) and upserts the minute rollups of exactly those rows, sorted by key so concurrent
writer processes always lock buckets in the same order (no deadlocks). A broken connection is
dropped and reopened on the next batch; meanwhile records go to the spool.

Secrets: the DSN's password stays in ``_dsn``; ``url``, ``repr`` and every error this
module raises or logs are redacted (psycopg quotes the connection string in some errors,
so connection failures are re-raised as :class:`LedgerConnectError` with a scrubbed
message and no chained original).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

import psycopg

from exporters.ledger.base import BilledRecord, LedgerUnavailable, WriteOutcome
from exporters.ledger.dsn import redact_dsn, scrub_error
from exporters.ledger.outcomes import TenantRequest, resolve_outcomes
from exporters.ledger.schema import (
    ATTEMPT_SQL,
    BILLED_COLUMNS,
    RAW_COLUMNS,
    ROLLUP_KEYS,
    ROLLUP_SUMS,
    billed_of_db,
    billing_key,
    migrate,
    normalize_ts,
)
from exporters.ledger.sink import GroupCommitSink
from exporters.ledger.spool import default_spool_dir

__all__ = ["LedgerConnectError", "PostgresLedger", "connect_postgres"]


class LedgerConnectError(LedgerUnavailable, psycopg.OperationalError):
    """Connecting to (or migrating) the PostgreSQL ledger failed; the message is scrubbed.

    A subclass of psycopg.OperationalError, so callers that caught the driver's error
    still catch it.
    """


_STAGE = "ledger_stage"
_COLS = ", ".join(RAW_COLUMNS)
_COPY = f"COPY {_STAGE} ({_COLS}) FROM STDIN"
_SCLASS = "CASE WHEN status = 'ok' THEN 'ok' ELSE 'error' END"
_ROLL_COLS = ", ".join((*ROLLUP_KEYS, *ROLLUP_SUMS))
_ROLL_SUMS = ", ".join(["COUNT(*)"] + [f"SUM({c})" for c in ROLLUP_SUMS[1:]])
_ROLL_UPDATES = ", ".join(f"{c} = usage_rollup_minute.{c} + excluded.{c}" for c in ROLLUP_SUMS)
_INSERT_NEW = (
    f"WITH ins AS (INSERT INTO usage_records ({_COLS}) SELECT {_COLS} FROM {_STAGE} "
    f"ON CONFLICT DO NOTHING RETURNING {_COLS}), "
    f"roll AS (INSERT INTO usage_rollup_minute ({_ROLL_COLS}) "
    f"SELECT substr(ts, 1, 16), tenant, model, operation, {_SCLASS}, {_ROLL_SUMS} FROM ins "
    f"GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 "
    f"ON CONFLICT ({', '.join(ROLLUP_KEYS)}) DO UPDATE SET {_ROLL_UPDATES}) "
    f"SELECT tenant, request_id, {ATTEMPT_SQL} FROM ins"
)
# The billed figures of the ok records of several (tenant, request_id) at once.
_BILLED = (
    f"SELECT u.tenant, u.request_id, {', '.join('u.' + c for c in BILLED_COLUMNS.split(', '))} "
    "FROM usage_records u JOIN unnest(%s::text[], %s::text[]) AS k(tenant, request_id) "
    "ON u.tenant = k.tenant AND u.request_id = k.request_id WHERE u.status = 'ok'"
)
# Keys in sorted order (the caller sorts), so concurrent writers lock them in one order.
_ADD_REPLAYS = (
    "INSERT INTO request_replays (tenant, request_id, replays, last_at) "
    "SELECT t, r, n, %s FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS k(t, r, n) "
    "ON CONFLICT (tenant, request_id) DO UPDATE SET "
    "replays = request_replays.replays + excluded.replays, last_at = excluded.last_at "
    "RETURNING tenant, request_id, replays"
)


def connect_postgres(
    url: str, *, connect_timeout_s: int = 5, create: bool = True
) -> psycopg.Connection:
    """Open an autocommit connection (we issue transactions explicitly) and migrate.

    Raises LedgerConnectError (message without the password) when that fails.
    """
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout_s)
    except (psycopg.Error, ValueError) as exc:  # ValueError: psycopg's bad-option errors
        raise LedgerConnectError(
            f"cannot connect to the PostgreSQL ledger {redact_dsn(url)}: {scrub_error(exc, url)}"
        ) from None
    if create:
        try:
            migrate(conn, "postgresql")
        except psycopg.Error as exc:
            conn.close()
            raise LedgerConnectError(
                f"migrating the PostgreSQL ledger {redact_dsn(url)} failed: {scrub_error(exc, url)}"
            ) from None
    return conn


class PostgresLedger(GroupCommitSink):
    """Group-committing PostgreSQL writer.

    ``spool_dir``: a server passes ``<data_dir>/ledger.spool`` (the same for every ledger
    kind); the default is :func:`~exporters.ledger.spool.default_spool_dir`.
    """

    def __init__(
        self,
        url: str,
        *,
        spool_dir: str | None = None,
        max_batch: int = 10_000,
        retry_interval_s: float = 1.0,
        connect_timeout_s: int = 5,
        max_pending: int = 100_000,
    ) -> None:
        self._dsn = self._secret_url = url
        self.url = redact_dsn(url)
        self._connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection | None = self._connect(create=True)
        self._start(
            name="ledger-postgres",
            spool_dir=spool_dir if spool_dir is not None else default_spool_dir(),
            max_batch=max_batch,
            retry_interval_s=retry_interval_s,
            max_pending=max_pending,
        )

    def _commit(
        self, rows: Sequence[tuple], repeats: Sequence[tuple], count_replays: bool
    ) -> list[WriteOutcome]:
        """One transaction: COPY the rows into a staging table, then one statement inserts
        the new ones (ON CONFLICT DO NOTHING), upserts their minute rollups (aggregated by
        PostgreSQL from exactly the inserted rows, buckets in key order so concurrent writer
        processes lock them in the same order: no deadlocks) and returns the new billing
        keys. Only for ok records not inserted (and ``repeats``) are the billed figures
        read and replays counted (exporters/ledger/outcomes.py), before COMMIT."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._connect(create=False)
        conn = self._conn
        try:
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(_COPY) as copy:
                    write_row = copy.write_row
                    for row in rows:
                        write_row(row)
                cur.execute(_INSERT_NEW)
                inserted = set(cur.fetchall())
                if len(inserted) == len(rows):
                    flags = [True] * len(rows)
                else:
                    flags = [billing_key(row) in inserted for row in rows]
                return resolve_outcomes(
                    rows,
                    flags,
                    repeats,
                    self._view,
                    fetch_existing=lambda keys: _fetch_billed(cur, keys),
                    add_replays=(lambda bumps: _add_replays(cur, bumps)) if count_replays else None,
                )
        except psycopg.Error:
            if conn.broken or conn.closed:
                self._conn = None
            raise

    def _connect(self, *, create: bool) -> psycopg.Connection:
        conn = connect_postgres(self._dsn, connect_timeout_s=self._connect_timeout_s, create=create)
        # Per-session staging table for COPY; emptied at every commit.
        conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE usage_records) ON COMMIT DELETE ROWS"
        )
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _fetch_billed(
    cur: psycopg.Cursor, keys: list[TenantRequest]
) -> dict[TenantRequest, BilledRecord]:
    cur.execute(_BILLED, ([k[0] for k in keys], [k[1] for k in keys]))
    return {(r[0], r[1]): billed_of_db(r[2:]) for r in cur.fetchall()}


def _add_replays(cur: psycopg.Cursor, bumps: dict[TenantRequest, int]) -> dict[TenantRequest, int]:
    keys = sorted(bumps)
    now = normalize_ts(_dt.datetime.now(_dt.timezone.utc))
    cur.execute(
        _ADD_REPLAYS,
        (now, [k[0] for k in keys], [k[1] for k in keys], [bumps[k] for k in keys]),
    )
    return {(r[0], r[1]): int(r[2]) for r in cur.fetchall()}
