"""Budgets as metrics: ``paddle_meter.budget.used``, ``.limit`` and ``.soft_limit``.

Registered by :class:`interceptors.core.MeteringCore` when it has a budget guard. Both
are gauges observed at collection time from :meth:`billing.budget_guard.BudgetGuard.figures`
(the last counter figures this process saw: at each reservation, settlement and
reconciliation; no I/O), one series per budget, in the budget's unit: the price table's
currency for cost budgets, tokens, characters or requests otherwise. ``used`` counts
billed usage only (reservations in flight are not spent). On Prometheus:
``paddle_meter_budget_used`` / ``paddle_meter_budget_limit``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from exporters import semconv as sc

if TYPE_CHECKING:
    from billing.budget_guard import BudgetGuard
    from billing.budgets import Budget

__all__ = ["BudgetMetrics"]

log = logging.getLogger(__name__)


def _unit_value(budget: Budget, amount: int) -> float:
    return amount / 1_000_000 if budget.metric == "cost" else float(amount)


class BudgetMetrics:
    """Observes ``guard`` on ``meter`` until :meth:`close`."""

    def __init__(self, meter: Meter, guard: BudgetGuard) -> None:
        self._guard = guard
        self._open = True
        meter.create_observable_gauge(
            sc.METRIC_BUDGET_USED,
            callbacks=[self._used],
            description="Billed usage of each budget in its current period (cost budgets in "
            "the price table's currency)",
        )
        meter.create_observable_gauge(
            sc.METRIC_BUDGET_LIMIT,
            callbacks=[self._limit],
            description="Hard limit of each budget per period, in the same unit as used",
        )
        meter.create_observable_gauge(
            sc.METRIC_BUDGET_SOFT_LIMIT,
            callbacks=[self._soft],
            description="Where each budget's soft limit warns, in the same unit as used",
        )

    def close(self) -> None:
        self._open = False

    def _observe(self, what: str) -> Iterable[Observation]:
        if not self._open:
            return ()
        try:
            figures = self._guard.figures()
        except Exception as exc:
            log.warning("budget figures unreadable: %s", type(exc).__name__,
                        extra={"error_type": type(exc).__name__})
            return ()
        amounts = {
            "used": lambda budget, counter: counter.used,
            "limit": lambda budget, counter: budget.limit,
            "soft": lambda budget, counter: budget.soft_threshold,
        }[what]
        return [
            Observation(
                _unit_value(budget, amounts(budget, counter)),
                {
                    sc.PADDLE_METER_TENANT: budget.tenant,
                    sc.PADDLE_METER_BUDGET_ID: budget.budget_id,
                    sc.PADDLE_METER_BUDGET_METRIC: budget.metric,
                    sc.PADDLE_METER_BUDGET_PERIOD: budget.period,
                },
            )
            for budget, _period, counter in figures
            if amounts(budget, counter) is not None
        ]

    def _used(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe("used")

    def _limit(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe("limit")

    def _soft(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe("soft")
