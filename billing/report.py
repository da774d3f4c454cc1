"""Usage reports: per period (day / week / month) and per tenant / model / operation.

Two sources give identical figures: the per-minute rollups (fast: a year is at most
525,600 buckets per key) and the raw records (the check). Both are grouped by UTC day in
SQL; days are then folded into ISO weeks (starting Monday) or calendar months here.
Bounds are UTC and cut at whole minutes (the rollup resolution); ``end`` is exclusive,
except that a bare date as ``end`` includes that whole day.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from billing.pricing import COST_QUANTUM, round_bill
from exporters.ledger.reader import LedgerReader
from exporters.ledger.schema import normalize_ts

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
    "billable_tokens",
    "cost_micros",
)
_MICRO = Decimal("0.000001")


def parse_bound(text: str, *, end: bool = False) -> str:
    """Minute key 'YYYY-MM-DDTHH:MM' (UTC) of a bound; a bare-date ``end`` is the next day.

    Raises ValueError for anything that is not an ISO-8601 date or timestamp.
    """
    text = str(text).strip()
    try:
        if len(text) == 10:
            day = _dt.date.fromisoformat(text)
            if end:
                day += _dt.timedelta(days=1)
            return day.isoformat() + "T00:00"
        return normalize_ts(text)[:16]
    except ValueError as exc:
        raise ValueError(f"bad date/time {text!r}: use YYYY-MM-DD or ISO-8601") from exc


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


def _daily_sql(source: str, by: tuple[str, ...], tenant: str | None, model: str | None) -> str:
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
    day = f"substr({tcol}, 1, 10)"
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
) -> list[dict[str, Any]]:
    """Report rows sorted by period then dimensions. Blocks on the database.

    Each row: ``period`` (date of the period's first day), the ``by`` dimensions, then
    METRICS: integer counts, ``cost`` (Decimal, 0.01), ``tokens_per_request`` ((input +
    output) / requests, Decimal 0.01), ``cost_per_request`` (Decimal, 6 places).
    Raises ValueError for bad bounds, period or dimensions.
    """
    dims = parse_by(by)
    if period not in PERIODS:
        raise ValueError(f"period must be one of {PERIODS}, not {period!r}")
    lo, hi = parse_bound(start), parse_bound(end, end=True)
    if hi <= lo:
        raise ValueError(f"empty period: from {start!r} is not before to {end!r}")
    params: list[Any] = [lo, hi]
    params += [v for v in (tenant, model) if v is not None]
    acc: dict[tuple[Any, ...], list[int]] = {}
    for row in reader.fetch_all(_daily_sql(source, dims, tenant, model), tuple(params)):
        key = (period_start(row[0], period), *row[1 : 1 + len(dims)])
        slot = acc.setdefault(key, [0] * len(_SUMS))
        for i, value in enumerate(row[1 + len(dims) :]):
            slot[i] += int(value or 0)
    out = []
    for key in sorted(acc):
        sums = dict(zip(_SUMS, acc[key], strict=True))
        exact_cost = Decimal(sums.pop("cost_micros")) * _MICRO
        n = sums["requests"]
        row: dict[str, Any] = {"period": key[0], **dict(zip(dims, key[1:], strict=True))}
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
