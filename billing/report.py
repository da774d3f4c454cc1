"""Usage reports: per period (day / week / month) and per tenant / model / operation.

Two sources give identical figures: the per-minute rollups (fast: a year is at most
525,600 buckets per key) and the raw records (the check). Periods are days of the report's
time zone (``billing.timezone``, or ``tz``; billing/periods.py): SQL groups by UTC day,
hour or minute, whichever bucket never straddles a local midnight, and the buckets are
folded here into local days, ISO weeks (starting Monday) or calendar months. Bounds are
read in that zone (a bare date is local midnight) and cut at whole minutes (the rollup
resolution); ``end`` is exclusive, except that a bare date as ``end`` includes that day.
Every row says its zone (``timezone``).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from billing.periods import bucket_chars, bucket_local_day, load_zone, utc_minute_key
from billing.pricing import COST_QUANTUM, round_bill
from exporters.ledger.reader import LedgerReader

__all__ = ["DIMENSIONS", "METRICS", "PERIODS", "build_report", "parse_bound", "period_start"]

DIMENSIONS = ("tenant", "model", "operation")
PERIODS = ("day", "week", "month")
METRICS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "characters",
    "images",
    "pages",
    "billable_tokens",
    "cost",
    "tokens_per_request",
    "cost_per_request",
)
_SUMS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "characters",
    "images",
    "pages",
    "billable_tokens",
    "cost_micros",
)
_MICRO = Decimal("0.000001")


def parse_bound(text: str, *, end: bool = False) -> str:
    """Minute key 'YYYY-MM-DDTHH:MM' (UTC) of a UTC bound; a bare-date ``end`` is the next
    day. Raises ValueError for anything that is not an ISO-8601 date or timestamp."""
    return utc_minute_key(text, load_zone("UTC"), end=end)


def period_start(day: str, period: str) -> _dt.date:
    """First day of the ``period`` containing ``day`` ('YYYY-MM-DD')."""
    d = _dt.date.fromisoformat(day)
    if period == "day":
        return d
    if period == "week":
        return d - _dt.timedelta(days=d.weekday())
    if period == "month":
        return d.replace(day=1)
    raise ValueError(f"period must be one of {PERIODS}, not {period!r}")


def parse_by(by: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validate the grouping dimensions ('tenant,model' or a sequence)."""
    if by is None:
        return ()
    items = [b.strip() for b in (by.split(",") if isinstance(by, str) else by) if b.strip()]
    bad = [b for b in items if b not in DIMENSIONS]
    if bad:
        raise ValueError(f"cannot group by {bad}; choose from {DIMENSIONS}")
    return tuple(dict.fromkeys(items))


def _bucket_sql(
    source: str, by: tuple[str, ...], tenant: str | None, model: str | None, chars: int
) -> str:
    if source == "rollup":
        table, tcol = "usage_rollup_minute", "minute"
        sums = (
            "SUM(requests)",
            "SUM(CASE WHEN status_class = 'error' THEN requests ELSE 0 END)",
            *(f"SUM({c})" for c in _SUMS[2:]),
        )
    elif source == "raw":
        table, tcol = "usage_records", "ts"
        sums = (
            "COUNT(*)",
            "SUM(CASE WHEN status = 'ok' THEN 0 ELSE 1 END)",
            *(f"SUM({c})" for c in _SUMS[2:]),
        )
    else:
        raise ValueError(f"source must be 'rollup' or 'raw', not {source!r}")
    day = f"substr({tcol}, 1, {int(chars)})"
    where = [f"{tcol} >= ?", f"{tcol} < ?"]
    if tenant is not None:
        where.append("tenant = ?")
    if model is not None:
        where.append("model = ?")
    group = ", ".join((day, *by))
    return (
        f"SELECT {group}, {', '.join(sums)} FROM {table} "
        f"WHERE {' AND '.join(where)} GROUP BY {group}"
    )


def build_report(
    reader: LedgerReader,
    *,
    start: str,
    end: str,
    period: str = "day",
    by: str | Sequence[str] | None = ("tenant", "model"),
    tenant: str | None = None,
    model: str | None = None,
    source: str = "rollup",
    tz: str | None = None,
) -> list[dict[str, Any]]:
    """Report rows sorted by period then dimensions. Blocks on the database.

    Each row: ``period`` (local date of the period's first day), ``timezone`` (the zone's
    IANA name: ``tz``, default UTC), the ``by`` dimensions, then
    METRICS: integer counts, ``cost`` (Decimal, 0.01), ``tokens_per_request`` ((input +
    output) / requests, Decimal 0.01), ``cost_per_request`` (Decimal, 6 places).
    Raises ValueError for bad bounds, period, zone or dimensions.
    """
    zone = load_zone(tz)
    dims = parse_by(by)
    if period not in PERIODS:
        raise ValueError(f"period must be one of {PERIODS}, not {period!r}")
    lo, hi = utc_minute_key(start, zone), utc_minute_key(end, zone, end=True)
    if hi <= lo:
        raise ValueError(f"empty period: from {start!r} is not before to {end!r}")
    params: list[Any] = [lo, hi]
    params += [v for v in (tenant, model) if v is not None]
    acc: dict[tuple[Any, ...], list[int]] = {}
    chars = bucket_chars(zone, lo, hi)
    sql = _bucket_sql(source, dims, tenant, model, chars)
    for row in reader.fetch_all(sql, tuple(params)):
        day = bucket_local_day(row[0], zone)
        key = (period_start(day.isoformat(), period), *row[1 : 1 + len(dims)])
        slot = acc.setdefault(key, [0] * len(_SUMS))
        for i, value in enumerate(row[1 + len(dims) :]):
            slot[i] += int(value or 0)
    out = []
    for key in sorted(acc):
        sums = dict(zip(_SUMS, acc[key], strict=True))
        exact_cost = Decimal(sums.pop("cost_micros")) * _MICRO
        n = sums["requests"]
        row: dict[str, Any] = {"period": key[0], "timezone": zone.key,
                               **dict(zip(dims, key[1:], strict=True))}
        row.update(sums)
        row["cost"] = round_bill(exact_cost)
        row["tokens_per_request"] = (
            (Decimal(sums["input_tokens"] + sums["output_tokens"]) / n).quantize(
                Decimal("0.01"), rounding=ROUND_HALF_UP
            )
            if n
            else Decimal("0.00")
        )
        row["cost_per_request"] = (
            (exact_cost / n).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)
            if n
            else Decimal(0).quantize(COST_QUANTUM)
        )
        out.append(row)
    return out
