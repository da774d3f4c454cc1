"""Where budgets stand: the rows ``budgets list`` / ``budgets show`` print and
``GET /v1/budgets`` returns (used, reserved, remaining, when the period resets)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from billing.budget_store import BudgetStore
from billing.budgets import Budget, format_cost
from billing.periods import calendar_period, load_zone

__all__ = ["budget_rows"]


def _figure(budget: Budget, amount: int) -> Any:
    """Cost in currency units (a decimal string, exact); other metrics as integers."""
    if budget.metric == "cost":
        return format_cost(amount)
    return amount


def budget_rows(
    store: BudgetStore,
    *,
    timezone: str,
    currency: str,
    tenant: str | None = None,
    at: _dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """One row per budget (of ``tenant``, else all) for the period holding ``at`` (now)."""
    zone = load_zone(timezone)
    at = at or _dt.datetime.now(_dt.timezone.utc)
    rows = []
    for budget in store.load():
        if tenant is not None and budget.tenant != tenant:
            continue
        period = calendar_period(budget.period, zone, at)
        counter = store.counter(budget, period)
        remaining = max(0, budget.limit - counter.used - counter.reserved)
        rows.append({
            "budget_id": budget.budget_id,
            "tenant": budget.tenant,
            "key": budget.api_key_id,
            "period": budget.period,
            "metric": budget.metric,
            "unit": currency if budget.metric == "cost" else budget.metric,
            "limit": _figure(budget, budget.limit),
            "used": _figure(budget, counter.used),
            "reserved": _figure(budget, counter.reserved),
            "remaining": _figure(budget, remaining),
            "soft": budget.soft,
            "soft_reached": budget.soft_threshold is not None
            and counter.used >= budget.soft_threshold,
            "period_start": period.local_start.isoformat(),
            "resets_at": period.local_end.isoformat(),
            "timezone": zone.key,
            "source": budget.source,
        })
    return rows
