"""Budgets and rate limits: what they are, how a call is measured against them, and the
words a refused caller reads.

A :class:`Budget` is an allowance of one tenant (optionally of one of its keys) over a
calendar period of ``billing.timezone`` (billing/periods.py), in one metric:

=============  ===================================================  ======================
metric         what a billed call adds                              unit of ``limit``
=============  ===================================================  ======================
``cost``       its cost (price table, :mod:`billing.pricing`)       micro-units of currency
``tokens``     its billable tokens                                   tokens
``characters`` its recognised characters (OCR)                       characters
``requests``   1                                                     requests
=============  ===================================================  ======================

Only successful (billed) calls count, as on the bill. ``soft`` (0 < soft <= 1) is the
fraction of the limit at which one warning event is raised; reaching the limit refuses.

The enforcement (reserve before inference, settle after, in the ledger database) is
billing/budget_guard.py and billing/budget_store.py; this module holds no state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

from billing.periods import BUDGET_PERIODS, CalendarPeriod

__all__ = [
    "METRICS",
    "Budget",
    "RateLimits",
    "budget_id",
    "budget_refusal_message",
    "format_amount",
    "format_cost",
    "metric_of_record",
    "parse_budget",
    "parse_budgets_config",
    "parse_rate_limits",
]

METRICS: Final = ("cost", "tokens", "characters", "requests")
_MICROS: Final = Decimal(1_000_000)
_UNIT_WORDS: Final = {
    "tokens": "billable tokens",
    "characters": "characters",
    "requests": "requests",
}
_BUDGET_KEYS: Final = {
    "tenant", "key", "period", "soft",
    "limit_cost", "limit_tokens", "limit_characters", "limit_requests",
}


def budget_id(tenant: str, api_key_id: str | None, period: str, metric: str) -> str:
    """The stable id of a budget: ``finance/*/month/cost`` (``*``: every key of the tenant).

    Tenants and key ids never hold ``/`` (interceptors/request_id.py, auth/keys.py)."""
    return f"{tenant}/{api_key_id or '*'}/{period}/{metric}"


@dataclasses.dataclass(frozen=True)
class Budget:
    """One allowance; ``limit`` in the metric's unit (cost: micro-units)."""

    tenant: str
    api_key_id: str | None
    period: str
    metric: str
    limit: int
    soft: float | None = None
    source: str = "cli"  # config | cli

    @property
    def budget_id(self) -> str:
        return budget_id(self.tenant, self.api_key_id, self.period, self.metric)

    @property
    def soft_threshold(self) -> int | None:
        """The amount at which the soft warning fires (None: no soft limit)."""
        return None if self.soft is None else math.ceil(self.limit * self.soft)

    def applies_to(self, tenant: str, api_key_id: str | None) -> bool:
        return tenant == self.tenant and (self.api_key_id is None or api_key_id == self.api_key_id)

    def who(self) -> str:
        """'tenant finance' or 'key ab12cd34ef56 of tenant finance'."""
        if self.api_key_id is None:
            return f"tenant {self.tenant}"
        return f"key {self.api_key_id} of tenant {self.tenant}"


@dataclasses.dataclass(frozen=True)
class RateLimits:
    """Per-key limits (per tenant while auth is off); None: no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def any(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


def metric_of_record(metric: str, *, ok: bool, billable_tokens: int, characters: int,
                     cost_micros: int) -> int:
    """What one ledger record adds to a budget of ``metric`` (0 for a failed call)."""
    if not ok:
        return 0
    if metric == "cost":
        return cost_micros
    if metric == "tokens":
        return billable_tokens
    if metric == "characters":
        return characters
    return 1


def format_amount(metric: str, amount: int, currency: str) -> str:
    """'500.00 CNY', '0.0144 CNY', '1,200 billable tokens'."""
    if metric == "cost":
        return f"{_figure(metric, amount)} {currency}"
    return f"{amount:,} {_UNIT_WORDS[metric]}"


def format_cost(micros: int) -> str:
    """A cost in micro-units, exactly, with at least 2 decimals: '500.00', '0.0144'.
    Rounding a small budget to cents would hide why a call is refused."""
    value = Decimal(micros) / _MICROS
    if value == value.quantize(Decimal("0.01")):
        return str(value.quantize(Decimal("0.01")))
    return str(value.quantize(Decimal("0.000001")).normalize())


def _figure(metric: str, amount: int) -> str:
    return format_cost(amount) if metric == "cost" else f"{amount:,}"


def budget_refusal_message(
    budget: Budget, period: CalendarPeriod, *, used: int, reserved: int, needed: int,
    currency: str,
) -> str:
    """What a caller refused by ``budget`` reads: who, how much of what, when it resets.

    'tenant finance has used 500.00 of 500.00 CNY this month; resets 2027-01-01 00:00
    Asia/Shanghai' (plus what calls in flight hold and what this call needs, when any).
    """
    limit = format_amount(budget.metric, budget.limit, currency)
    text = f"{budget.who()} has used {_figure(budget.metric, used)} of {limit} {period.label()}"
    extras = []
    if reserved > 0:
        extras.append(f"{_figure(budget.metric, reserved)} more held by calls in flight")
    if needed > 0 and budget.metric != "requests":  # a request always needs one
        extras.append(f"this call needs {_figure(budget.metric, needed)}")
    if extras:
        text += f" ({'; '.join(extras)})"
    return f"{text}; resets {period.describe_reset()}"


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected an integer >= 1, got {value!r}")
    return value


def _limit_of(metric: str, value: Any, where: str) -> int:
    if metric != "cost":
        return _positive_int(value, where)
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError(f"{where}: expected an amount such as 500 or '499.50', got {value!r}")
    try:
        amount = Decimal(str(value))
    except ArithmeticError:
        raise ValueError(f"{where}: {value!r} is not an amount") from None
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(Decimal("0.000001")):
        raise ValueError(f"{where}: expected a positive amount with at most 6 decimals")
    return int(amount * _MICROS)


def parse_budget(entry: Mapping[str, Any], *, source: str, where: str = "budget") -> Budget:
    """One budget from ``{tenant, key?, period, limit_<metric>, soft?}``; ValueError
    naming the field otherwise. Exactly one ``limit_*`` is given."""
    from interceptors.request_id import TENANT_PATTERN

    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a mapping with tenant, period and one limit_*")
    unknown = sorted(set(entry) - _BUDGET_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(_BUDGET_KEYS)}")
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or TENANT_PATTERN.fullmatch(tenant) is None:
        raise ValueError(f"{where}.tenant: 1 to 64 characters of A-Z a-z 0-9 . _ -, got {tenant!r}")
    key = entry.get("key")
    if key is not None and (not isinstance(key, str) or not key.isalnum() or len(key) != 12):
        raise ValueError(f"{where}.key: a 12-character key id (keys list), got {key!r}")
    period = entry.get("period")
    if period not in BUDGET_PERIODS:
        raise ValueError(f"{where}.period: one of {', '.join(BUDGET_PERIODS)}, got {period!r}")
    limits = [m for m in METRICS if entry.get(f"limit_{m}") is not None]
    if len(limits) != 1:
        raise ValueError(
            f"{where}: give exactly one of {', '.join('limit_' + m for m in METRICS)}"
        )
    metric = limits[0]
    limit = _limit_of(metric, entry[f"limit_{metric}"], f"{where}.limit_{metric}")
    soft = entry.get("soft")
    if soft is not None:
        if isinstance(soft, bool) or not isinstance(soft, (int, float)) or not 0 < soft <= 1:
            raise ValueError(f"{where}.soft: a fraction of the limit, 0 < soft <= 1, got {soft!r}")
        soft = float(soft)
    return Budget(tenant, key, period, metric, limit, soft, source)


def parse_budgets_config(entries: Sequence[Any] | None) -> list[Budget]:
    """``budgets.limits`` of the config; ValueError on a bad entry or a duplicate."""
    if entries is None:
        return []
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ValueError("budgets.limits: expected a list of budgets")
    budgets = [
        parse_budget(e, source="config", where=f"budgets.limits[{i}]") for i, e in enumerate(entries)
    ]
    ids = [b.budget_id for b in budgets]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"budgets.limits: the same budget twice: {dup}")
    return budgets


def parse_rate_limits(block: Mapping[str, Any] | None) -> tuple[RateLimits, dict[str, RateLimits]]:
    """``rate_limits`` of the config: (the default per key, per-key overrides by key id)."""
    block = dict(block or {})

    def one(values: Mapping[str, Any], where: str) -> RateLimits:
        got = {}
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = values.get(name)
            got[name] = None if value is None else _positive_int(value, f"{where}.{name}")
        return RateLimits(**got)

    keys = block.pop("keys", None) or {}
    if not isinstance(keys, Mapping):
        raise ValueError("rate_limits.keys: expected a mapping of key id to limits")
    overrides = {}
    for key_id, values in keys.items():
        if not isinstance(values, Mapping) or set(values) - {
            "requests_per_minute", "tokens_per_minute"
        }:
            raise ValueError(
                f"rate_limits.keys.{key_id}: expected requests_per_minute / tokens_per_minute"
            )
        overrides[str(key_id)] = one(values, f"rate_limits.keys.{key_id}")
    return one(block, "rate_limits"), overrides
