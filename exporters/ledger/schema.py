"""Ledger schema, its versioned migrations, and record <-> row conversion.

One schema for SQLite and PostgreSQL (only column types differ). Seven tables:
``usage_records`` (one row per request attempt), ``usage_rollup_minute`` (per-minute
aggregates by tenant/model/operation/status class, updated in the same transaction as
the raw rows so reports need not scan raw records), ``bill_audit`` (old and new figures
of every repriced record), ``request_replays`` (how often an ok record was replayed),
and since v5 the API keys (auth/keys.py): ``api_keys`` (one row per key, holding only
its keyed digest, never the key), ``key_events`` (audit trail: created, revoked,
rotated) and ``auth_meta`` (a check value of the server secret the digests are keyed
with, so a server started with another secret is refused instead of rejecting every key).
``schema_migrations`` records which migrations ran; :func:`migrate` upgrades an existing
ledger in place.

The billing key (since v4) is per tenant: a UNIQUE index over (tenant, request_id,
:data:`ATTEMPT_SQL`), i.e. at most one ok (billed) record per (tenant, request_id), and
every failed attempt its own row keyed by its span id (its timestamp when it has none),
so a failed first attempt never blocks billing the successful retry, and a spool replay
of the same failed attempt is still deduplicated. :func:`billing_key` is the same key
computed on a row tuple; the two must agree.

Timestamps are stored as UTC ISO-8601 text with a fixed layout
(``YYYY-MM-DDTHH:MM:SS.ffffff+00:00``), so text order is time order in both databases and
``substr(ts, 1, 16)`` is the minute. Costs are also kept as integer micro-units
(``cost_micros``): the price rounding rule keeps 6 decimals, so sums stay exact.
"""

from __future__ import annotations

import datetime as _dt
import operator
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

from exporters.ledger.base import BilledRecord
from exporters.usage_record import LEDGER_COLUMNS, UsageRecord

__all__ = [
    "ATTEMPT_SQL",
    "RAW_COLUMNS",
    "ROLLUP_KEYS",
    "ROLLUP_SUMS",
    "USAGE_COUNTS",
    "SCHEMA_VERSION",
    "billed_of_row",
    "billing_key",
    "cost_to_micros",
    "migrate",
    "normalize_ts",
    "record_to_row",
    "rollup_from_new_sql",
    "rollup_rows",
    "row_to_record",
    "status_class",
]

# The per-record counts that are summed into bills and rollups, in column order.
USAGE_COUNTS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "characters",
    "images",
    "pages",
    "billable_tokens",
    "request_bytes",
    "response_bytes",
)
_INT_COLUMNS = {*USAGE_COUNTS, "truncated", "cost_micros"}
RAW_COLUMNS: tuple[str, ...] = (*LEDGER_COLUMNS, "cost_micros")
ROLLUP_KEYS: tuple[str, ...] = ("minute", "tenant", "model", "operation", "status_class")
ROLLUP_SUMS: tuple[str, ...] = ("requests", *USAGE_COUNTS, "cost_micros")
# Columns added by later migrations (v8: pages). Migrations 1-4 build the tables of their
# own version, without these; the migration that adds a column adds it to both tables.
_LATER_COLUMNS = frozenset({"pages"})
_V1_RAW_COLUMNS: tuple[str, ...] = tuple(c for c in RAW_COLUMNS if c not in _LATER_COLUMNS)
_V1_ROLLUP_SUMS: tuple[str, ...] = tuple(c for c in ROLLUP_SUMS if c not in _LATER_COLUMNS)
_MICRO = Decimal("0.000001")


def normalize_ts(value: str | _dt.datetime) -> str:
    """Canonical UTC text form of a timestamp; naive input is taken as UTC. Raises ValueError."""
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"not an ISO-8601 timestamp: {value!r}") from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    elif value.utcoffset():
        value = value.astimezone(_dt.timezone.utc)
    # isoformat (C, fixed layout with timespec) is ~5x cheaper than strftime on the hot path
    return value.replace(tzinfo=_dt.timezone.utc).isoformat(timespec="microseconds")


def cost_to_micros(cost: str | None) -> int:
    """Integer micro-units of a decimal cost string (None counts as 0). Raises ValueError."""
    if cost is None or cost == "":
        return 0
    # Fast path for the usual plain form "123.000456" (what pricing writes).
    whole, dot, frac = cost.partition(".")
    if (
        dot
        and len(frac) <= 6
        and whole.isdigit()
        and frac.isdigit()
        and frac.isascii()
        and whole.isascii()
    ):
        return int(whole) * 1_000_000 + int(frac.ljust(6, "0"))
    try:
        micros = Decimal(cost) / _MICRO
    except ArithmeticError as exc:
        raise ValueError(f"cost is not a decimal string: {cost!r}") from exc
    if micros != micros.to_integral_value():
        raise ValueError(f"cost has more than 6 decimal places: {cost!r}")
    return int(micros)


def status_class(status: str) -> str:
    return "ok" if status == "ok" else "error"


def record_to_row(record: UsageRecord) -> tuple[Any, ...]:
    """Row tuple in RAW_COLUMNS order, timestamp normalised."""
    # One C-level attrgetter, not dataclasses.asdict (which deep-copies) nor a getattr
    # per column: this runs once per submitted record.
    row = list(_GET_COLUMNS(record))
    row[_TS] = normalize_ts(record.ts)
    row[_TRUNCATED] = 1 if record.truncated else 0
    if row[_SPAN] == "":
        row[_SPAN] = None  # an empty span id would key a failed attempt like the ok record
    row.append(cost_to_micros(record.cost))
    return tuple(row)


_GET_COLUMNS = operator.attrgetter(*LEDGER_COLUMNS)
_TS = LEDGER_COLUMNS.index("ts")
_TRUNCATED = LEDGER_COLUMNS.index("truncated")
_SPAN = LEDGER_COLUMNS.index("span_id")
_TENANT = LEDGER_COLUMNS.index("tenant")
_STATUS = LEDGER_COLUMNS.index("status")
_SHA = LEDGER_COLUMNS.index("content_sha256")
_BILLED = tuple(
    LEDGER_COLUMNS.index(c)
    for c in ("content_sha256", "input_tokens", "output_tokens", "billable_tokens", "price_id", "cost")
)
_GET_BILLED = operator.itemgetter(*_BILLED)

# The third part of the billing key, in SQL: '' for the ok record, else the attempt.
ATTEMPT_SQL = "CASE WHEN status = 'ok' THEN '' ELSE COALESCE(span_id, ts) END"
BILLED_COLUMNS = "content_sha256, input_tokens, output_tokens, billable_tokens, price_id, cost"


def billing_key(row: Sequence[Any]) -> tuple[str, str, str]:
    """(tenant, request_id, attempt) of a row tuple: the v4 UNIQUE index, computed here.

    ``attempt`` is '' for an ok record, else the span id (the timestamp when None),
    exactly as :data:`ATTEMPT_SQL` computes it.
    """
    if row[_STATUS] == "ok":
        return (row[_TENANT], row[0], "")
    span = row[_SPAN]
    return (row[_TENANT], row[0], span if span is not None else row[_TS])


def billed_of_row(row: Sequence[Any]) -> BilledRecord:
    """The :class:`BilledRecord` figures of an (ok) row tuple."""
    return BilledRecord(*_GET_BILLED(row))


def billed_of_db(values: Sequence[Any]) -> BilledRecord:
    """A BilledRecord from the columns of :data:`BILLED_COLUMNS` as a database returns them."""
    sha, inp, out, billable, price_id, cost = values
    return BilledRecord(sha, int(inp or 0), int(out or 0), int(billable or 0), price_id, cost)


def row_to_record(row: Sequence[Any]) -> UsageRecord:
    """Inverse of :func:`record_to_row` for rows selected in RAW_COLUMNS order."""
    values = dict(zip(RAW_COLUMNS, row, strict=True))
    values.pop("cost_micros")
    for name in _INT_COLUMNS & values.keys():
        values[name] = int(values[name] or 0)
    values["truncated"] = bool(values["truncated"])
    values["duration_ms"] = float(values["duration_ms"])
    return UsageRecord(**values)


def rollup_rows(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Aggregate raw rows (RAW_COLUMNS order) into rollup rows (ROLLUP_KEYS + ROLLUP_SUMS)."""
    ts, tenant, model, op, status = (
        RAW_COLUMNS.index(c) for c in ("ts", "tenant", "model", "operation", "status")
    )
    sum_idx = [RAW_COLUMNS.index(c) for c in ROLLUP_SUMS[1:]]
    acc: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        key = (
            row[ts][:16],
            row[tenant],
            row[model],
            row[op],
            "ok" if row[status] == "ok" else "error",
        )
        slot = acc.get(key)
        if slot is None:
            slot = acc[key] = [0] * len(ROLLUP_SUMS)
        slot[0] += 1
        for j, i in enumerate(sum_idx, start=1):
            slot[j] += row[i] or 0
    return [(*k, *v) for k, v in acc.items()]


def rollup_upsert_sql(ph: str) -> str:
    """INSERT ... ON CONFLICT DO UPDATE adding to an existing minute bucket (both dialects)."""
    cols = (*ROLLUP_KEYS, *ROLLUP_SUMS)
    updates = ", ".join(f"{c} = usage_rollup_minute.{c} + excluded.{c}" for c in ROLLUP_SUMS)
    return (
        f"INSERT INTO usage_rollup_minute ({', '.join(cols)}) "
        f"VALUES ({', '.join([ph] * len(cols))}) "
        f"ON CONFLICT ({', '.join(ROLLUP_KEYS)}) DO UPDATE SET {updates}"
    )


def _rollup_select(where: str) -> str:
    """SELECT aggregating usage_records into rollup rows (ROLLUP_KEYS + ROLLUP_SUMS)."""
    sums = ", ".join(["COUNT(*)"] + [f"SUM({s})" for s in ROLLUP_SUMS[1:]])
    sclass = "CASE WHEN status = 'ok' THEN 'ok' ELSE 'error' END"
    return (
        f"SELECT substr(ts, 1, 16), tenant, model, operation, {sclass}, {sums} "
        f"FROM usage_records WHERE {where} "
        f"GROUP BY substr(ts, 1, 16), tenant, model, operation, {sclass}"
    )


def rollup_from_new_sql() -> str:
    """SQLite: add the rows with rowid > ? to their minute buckets (one upsert per bucket).

    Same aggregation as the migration's backfill and as :func:`rollup_rows`.
    """
    cols = (*ROLLUP_KEYS, *ROLLUP_SUMS)
    updates = ", ".join(f"{c} = usage_rollup_minute.{c} + excluded.{c}" for c in ROLLUP_SUMS)
    return (
        f"INSERT INTO usage_rollup_minute ({', '.join(cols)}) "
        f"{_rollup_select('rowid > ?')} "
        f"ON CONFLICT ({', '.join(ROLLUP_KEYS)}) DO UPDATE SET {updates}"
    )


def _types(dialect: str) -> dict[str, str]:
    if dialect == "postgresql":
        return {"int": "BIGINT", "real": "DOUBLE PRECISION", "text": "TEXT"}
    return {"int": "INTEGER", "real": "REAL", "text": "TEXT"}


def _raw_ddl(dialect: str) -> list[str]:
    """v1: usage_records with the columns of v1 (later ones come with their migration)."""
    t = _types(dialect)
    cols = []
    for name in _V1_RAW_COLUMNS:
        if name == "request_id":
            cols.append("request_id TEXT PRIMARY KEY")
        elif name == "duration_ms":
            cols.append(f"duration_ms {t['real']} NOT NULL")
        elif name in _INT_COLUMNS:
            cols.append(f"{name} {t['int']} NOT NULL DEFAULT 0")
        elif name in ("ts", "tenant", "model", "operation", "protocol", "endpoint", "status"):
            cols.append(f"{name} TEXT NOT NULL")
        else:
            cols.append(f"{name} TEXT")
    return [
        f"CREATE TABLE IF NOT EXISTS usage_records ({', '.join(cols)})",
        "CREATE INDEX IF NOT EXISTS usage_records_ts ON usage_records (ts)",
        "CREATE INDEX IF NOT EXISTS usage_records_tenant_ts ON usage_records (tenant, ts)",
    ]


def _rollup_ddl(dialect: str) -> list[str]:
    t = _types(dialect)
    keys = ", ".join(f"{k} TEXT NOT NULL" for k in ROLLUP_KEYS)
    sums = ", ".join(f"{s} {t['int']} NOT NULL DEFAULT 0" for s in _V1_ROLLUP_SUMS)
    cols = ", ".join((*ROLLUP_KEYS, *_V1_ROLLUP_SUMS))
    raw_sums = ", ".join(["COUNT(*)"] + [f"SUM({s})" for s in _V1_ROLLUP_SUMS[1:]])
    return [
        f"CREATE TABLE IF NOT EXISTS usage_rollup_minute ({keys}, {sums}, "
        f"PRIMARY KEY ({', '.join(ROLLUP_KEYS)}))",
        # Upgrading a ledger that predates rollups: backfill them from the raw rows.
        f"INSERT INTO usage_rollup_minute ({cols}) "
        f"SELECT substr(ts, 1, 16), tenant, model, operation, "
        f"CASE WHEN status = 'ok' THEN 'ok' ELSE 'error' END, {raw_sums} "
        f"FROM usage_records GROUP BY substr(ts, 1, 16), tenant, model, operation, "
        f"CASE WHEN status = 'ok' THEN 'ok' ELSE 'error' END",
    ]


def _audit_ddl(dialect: str) -> list[str]:
    serial = (
        "BIGSERIAL PRIMARY KEY"
        if dialect == "postgresql"
        else ("INTEGER PRIMARY KEY AUTOINCREMENT")
    )
    return [
        f"CREATE TABLE IF NOT EXISTS bill_audit (id {serial}, request_id TEXT NOT NULL, "
        "changed_at TEXT NOT NULL, changed_by TEXT NOT NULL, reason TEXT, "
        "old_price_id TEXT, old_cost TEXT, new_price_id TEXT, new_cost TEXT)",
        "CREATE INDEX IF NOT EXISTS bill_audit_request ON bill_audit (request_id)",
    ]


def _per_tenant_key_ddl(dialect: str) -> list[str]:
    """v4: the billing key becomes (tenant, request_id, attempt); request_replays.

    SQLite cannot drop a PRIMARY KEY in place, so usage_records is rebuilt (rows copied
    with their rowids, so rowid order is kept; its indexes recreated) inside the
    migration transaction. PostgreSQL drops the primary-key constraint. Either way the
    old key guaranteed request_id unique, so no existing row can violate the new index.
    bill_audit gets the record's tenant and attempt (backfilled: request_id was unique).
    """
    t = _types(dialect)
    key_index = (
        "CREATE UNIQUE INDEX IF NOT EXISTS usage_records_billing_key "
        f"ON usage_records (tenant, request_id, ({ATTEMPT_SQL}))"
    )
    if dialect == "postgresql":
        rebuild = [
            "DO $$ DECLARE c text; BEGIN "
            "SELECT conname INTO c FROM pg_constraint "
            "WHERE conrelid = 'usage_records'::regclass AND contype = 'p'; "
            "IF c IS NOT NULL THEN "
            "EXECUTE format('ALTER TABLE usage_records DROP CONSTRAINT %I', c); "
            "END IF; END $$",
            "ALTER TABLE usage_records ALTER COLUMN request_id SET NOT NULL",
        ]
    else:
        create, *indexes = _raw_ddl(dialect)
        cols = ", ".join(_V1_RAW_COLUMNS)
        rebuild = [
            create.replace("request_id TEXT PRIMARY KEY", "request_id TEXT NOT NULL").replace(
                "EXISTS usage_records (", "EXISTS usage_records_v4 ("
            ),
            f"INSERT INTO usage_records_v4 (rowid, {cols}) "
            f"SELECT rowid, {cols} FROM usage_records ORDER BY rowid",
            "DROP TABLE usage_records",
            "ALTER TABLE usage_records_v4 RENAME TO usage_records",
            *indexes,
        ]
    return [
        *rebuild,
        key_index,
        f"CREATE TABLE IF NOT EXISTS request_replays (tenant TEXT NOT NULL, "
        f"request_id TEXT NOT NULL, replays {t['int']} NOT NULL, last_at TEXT, "
        "PRIMARY KEY (tenant, request_id))",
        "ALTER TABLE bill_audit ADD COLUMN tenant TEXT",
        "ALTER TABLE bill_audit ADD COLUMN attempt TEXT",
        "UPDATE bill_audit SET tenant = (SELECT u.tenant FROM usage_records u "
        "WHERE u.request_id = bill_audit.request_id), "
        # unqualified status/span_id/ts resolve to u: bill_audit has no such columns
        f"attempt = (SELECT {ATTEMPT_SQL} FROM usage_records u "
        "WHERE u.request_id = bill_audit.request_id)",
        "DROP INDEX IF EXISTS bill_audit_request",
        "CREATE INDEX IF NOT EXISTS bill_audit_record ON bill_audit (tenant, request_id, attempt)",
    ]


def _keys_ddl(dialect: str) -> list[str]:
    """v5: api_keys, key_events and auth_meta (auth/keys.py reads and writes them).

    Timestamps are :func:`normalize_ts` text like everywhere else. No foreign key from
    key_events to api_keys: the audit trail outlives any cleanup of the key table.
    """
    serial = (
        "BIGSERIAL PRIMARY KEY" if dialect == "postgresql" else "INTEGER PRIMARY KEY AUTOINCREMENT"
    )
    return [
        "CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
        "role TEXT NOT NULL, name TEXT, hint TEXT NOT NULL, digest TEXT NOT NULL, "
        "created_at TEXT NOT NULL, expires_at TEXT, revoked_at TEXT, last_used_at TEXT, "
        "previous_digest TEXT, previous_valid_until TEXT, updated_at TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS api_keys_created ON api_keys (created_at)",
        f"CREATE TABLE IF NOT EXISTS key_events (id {serial}, key_id TEXT NOT NULL, "
        "at TEXT NOT NULL, event TEXT NOT NULL, actor TEXT, detail TEXT)",
        "CREATE INDEX IF NOT EXISTS key_events_key ON key_events (key_id, at)",
        "CREATE TABLE IF NOT EXISTS auth_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ]


def _budgets_ddl(dialect: str) -> list[str]:
    """v6: budgets, their period counters and in-flight reservations, and the token buckets
    of the rate limits (billing/budget_store.py reads and writes them).

    Limits and counters are integers in the metric's unit (cost in micro-units of the
    price table's currency, like ``cost_micros``). ``period_start`` / ``period_end`` and
    ``record_ts`` are :func:`normalize_ts` text; ``expires_at`` and the bucket times are
    epoch seconds (compared as numbers by every worker).
    """
    big = "BIGINT" if dialect == "postgresql" else "INTEGER"
    real = "DOUBLE PRECISION" if dialect == "postgresql" else "REAL"
    return [
        "CREATE TABLE IF NOT EXISTS budgets (budget_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
        "api_key_id TEXT, period TEXT NOT NULL, metric TEXT NOT NULL, "
        f"limit_amount {big} NOT NULL, soft_fraction {real}, source TEXT NOT NULL, "
        "updated_at TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS budget_counters (budget_id TEXT NOT NULL, "
        f"period_start TEXT NOT NULL, period_end TEXT NOT NULL, used {big} NOT NULL, "
        f"reserved {big} NOT NULL, reconciled_at TEXT, PRIMARY KEY (budget_id, period_start))",
        "CREATE TABLE IF NOT EXISTS budget_reservations (reservation_id TEXT NOT NULL, "
        f"budget_id TEXT NOT NULL, period_start TEXT NOT NULL, amount {big} NOT NULL, "
        f"request_id TEXT NOT NULL, record_ts TEXT NOT NULL, expires_at {real} NOT NULL, "
        "PRIMARY KEY (reservation_id, budget_id))",
        "CREATE INDEX IF NOT EXISTS budget_reservations_expiry ON budget_reservations "
        "(expires_at)",
        "CREATE INDEX IF NOT EXISTS budget_reservations_record ON budget_reservations "
        "(budget_id, request_id, record_ts)",
        f"CREATE TABLE IF NOT EXISTS rate_buckets (bucket TEXT PRIMARY KEY, level {real} NOT NULL, "
        f"updated_at {real} NOT NULL)",
    ]


def _anomalies_ddl(dialect: str) -> list[str]:
    """v7: anomalies the built-in detector raised (billing/anomalies.py), one row each;
    every worker and replica checks this table before raising one (cooldown)."""
    serial = (
        "BIGSERIAL PRIMARY KEY" if dialect == "postgresql" else "INTEGER PRIMARY KEY AUTOINCREMENT"
    )
    real = "DOUBLE PRECISION" if dialect == "postgresql" else "REAL"
    return [
        f"CREATE TABLE IF NOT EXISTS anomalies (id {serial}, rule TEXT NOT NULL, "
        f"tenant TEXT NOT NULL, detected_at TEXT NOT NULL, value {real} NOT NULL, "
        f"threshold {real} NOT NULL, summary TEXT NOT NULL, details TEXT NOT NULL, "
        "delivered TEXT)",
        "CREATE INDEX IF NOT EXISTS anomalies_rule ON anomalies (rule, tenant, detected_at)",
        "CREATE INDEX IF NOT EXISTS anomalies_detected ON anomalies (detected_at)",
    ]


def _pages_ddl(dialect: str) -> list[str]:
    """v8: ``pages`` (pages OCRed: 1 per image, N per N-page PDF) on usage_records and
    the minute rollups. Every record before v8 was one image (PDFs came with v8), so
    existing rows get ``pages = images``."""
    t = _types(dialect)
    return [
        f"ALTER TABLE usage_records ADD COLUMN pages {t['int']} NOT NULL DEFAULT 0",
        "UPDATE usage_records SET pages = images WHERE images <> 0",
        f"ALTER TABLE usage_rollup_minute ADD COLUMN pages {t['int']} NOT NULL DEFAULT 0",
        "UPDATE usage_rollup_minute SET pages = images WHERE images <> 0",
    ]


# (version, description, DDL builder). Append only: released versions never change.
MIGRATIONS: tuple[tuple[int, str, Callable[[str], list[str]]], ...] = (
    (1, "usage_records", _raw_ddl),
    (2, "usage_rollup_minute (backfilled from usage_records)", _rollup_ddl),
    (3, "bill_audit", _audit_ddl),
    (4, "per-tenant billing key, request_replays, bill_audit tenant", _per_tenant_key_ddl),
    (5, "api_keys, key_events, auth_meta", _keys_ddl),
    (6, "budgets, budget_counters, budget_reservations, rate_buckets", _budgets_ddl),
    (7, "anomalies", _anomalies_ddl),
    (8, "pages on usage_records and usage_rollup_minute", _pages_ddl),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(conn: Any, dialect: str, *, up_to: int = SCHEMA_VERSION) -> list[int]:
    """Apply pending migrations in one transaction; returns the versions applied.

    ``conn`` is a DB-API connection not inside a transaction. Concurrent callers (several
    worker processes starting together) serialise on a lock: BEGIN IMMEDIATE in SQLite, a
    transaction-scoped advisory lock in PostgreSQL.
    """
    ph = "%s" if dialect == "postgresql" else "?"
    cur = conn.cursor()
    if dialect == "postgresql":
        cur.execute("BEGIN")
        cur.execute("SELECT pg_advisory_xact_lock(727001)")
    else:
        cur.execute("BEGIN IMMEDIATE")
    try:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            "description TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        cur.execute("SELECT version FROM schema_migrations")
        done = {int(r[0]) for r in cur.fetchall()}
        applied = []
        for version, description, ddl in MIGRATIONS:
            if version in done or version > up_to:
                continue
            for stmt in ddl(dialect):
                cur.execute(stmt)
            cur.execute(
                f"INSERT INTO schema_migrations (version, description, applied_at) "
                f"VALUES ({ph}, {ph}, {ph})",
                (version, description, normalize_ts(_dt.datetime.now(_dt.timezone.utc))),
            )
            applied.append(version)
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    return applied
