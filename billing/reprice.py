"""``bill reprice``: re-rate a period after a price change, keeping an audit trail.

In one transaction: every record of the period is priced again with the current price
table (at its own timestamp); where price_id or cost changed, the record is updated, the
old and new figures go to ``bill_audit`` (who, when, why), and the per-minute rollups get
the cost difference, so rollup and raw reports still agree. A record is identified by its
billing key (tenant, request_id, attempt): request ids are per tenant, and several
failed attempts may share one (exporters/ledger/schema.py).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import getpass
from decimal import Decimal

from billing.pricing import PriceBook
from billing.report import parse_bound
from exporters.ledger.reader import LedgerReader
from exporters.ledger.schema import (
    ATTEMPT_SQL,
    RAW_COLUMNS,
    cost_to_micros,
    normalize_ts,
    row_to_record,
    status_class,
)

__all__ = ["RepriceResult", "reprice"]

_MICRO = Decimal("0.000001")


@dataclasses.dataclass
class RepriceResult:
    examined: int
    changed: int
    old_total: Decimal  # exact (6-decimal) sums over the examined records
    new_total: Decimal


def reprice(reader: LedgerReader, book: PriceBook, *, start: str, end: str,
            changed_by: str | None = None, reason: str | None = None,
            dry_run: bool = False) -> RepriceResult:
    """Re-rate [start, end) with ``book``; blocks; all-or-nothing (one transaction)."""
    lo, hi = parse_bound(start), parse_bound(end, end=True)
    who = changed_by or _user()
    now = normalize_ts(_dt.datetime.now(_dt.timezone.utc))
    examined = changed = 0
    old_micros = new_micros = 0
    # (tenant, request_id, attempt, old price_id, old cost, new price_id, new cost, micros)
    changes: list[tuple[str, str, str, str | None, str | None, str | None, str, int]] = []
    rollup_delta: dict[tuple[str, str, str, str, str], int] = {}
    with reader.transaction() as cur:
        cur.execute(reader.sql(
            f"SELECT {', '.join(RAW_COLUMNS)}, {ATTEMPT_SQL} FROM usage_records "
            "WHERE ts >= ? AND ts < ? ORDER BY ts"), (lo, hi))
        # Materialised: the updates below must not disturb an open scan (SQLite), and
        # the period being repriced is bounded by the caller.
        rows = cur.fetchall()
        for row in rows:
            rec = row_to_record(row[:-1])
            examined += 1
            price_id, cost = book.price(rec)
            old = cost_to_micros(rec.cost)
            new = cost_to_micros(cost)
            old_micros += old
            new_micros += new
            if price_id == rec.price_id and new == old and rec.cost is not None:
                continue
            changed += 1
            changes.append((rec.tenant, rec.request_id, row[-1], rec.price_id, rec.cost,
                            price_id, cost, new))
            if new != old:
                key = (rec.ts[:16], rec.tenant, rec.model, rec.operation,
                       status_class(rec.status))
                rollup_delta[key] = rollup_delta.get(key, 0) + new - old
        if not dry_run and changes:
            # the WHERE matches the billing-key index expression, so each is an index lookup
            cur.executemany(reader.sql(
                "UPDATE usage_records SET price_id = ?, cost = ?, cost_micros = ? "
                f"WHERE tenant = ? AND request_id = ? AND {ATTEMPT_SQL} = ?"),
                [(pid, cost, micros, tenant, rid, attempt)
                 for tenant, rid, attempt, _, _, pid, cost, micros in changes])
            cur.executemany(reader.sql(
                "INSERT INTO bill_audit (tenant, request_id, attempt, changed_at, changed_by, "
                "reason, old_price_id, old_cost, new_price_id, new_cost) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                [(tenant, rid, attempt, now, who, reason, opid, ocost, pid, cost)
                 for tenant, rid, attempt, opid, ocost, pid, cost, _ in changes])
            cur.executemany(reader.sql(
                "UPDATE usage_rollup_minute SET cost_micros = cost_micros + ? "
                "WHERE minute = ? AND tenant = ? AND model = ? AND operation = ? "
                "AND status_class = ?"),
                [(delta, *key) for key, delta in sorted(rollup_delta.items())])
    return RepriceResult(examined, changed, Decimal(old_micros) * _MICRO,
                         Decimal(new_micros) * _MICRO)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
