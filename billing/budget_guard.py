"""Enforcing budgets and rate limits in a serving process: reserve before inference,
settle after the ledger write, keep the counters true to the ledger.

The metering core (interceptors/call.py) asks :meth:`BudgetGuard.reserve` once a call's
input is decoded and before its model runs, with what the call will bill as far as it is
known then (billing/budgets.py :class:`UsageEstimate`): ERNIE's exact token count, OCR's
image count, whose characters are estimated at ``budgets.ocr_estimate_chars_per_image``
each. A refusal is a ServingError ``rate_limited`` (gRPC RESOURCE_EXHAUSTED, HTTP 429,
pipeline err_no 4029) with ``Retry-After``: the time until the period resets (budget) or
the bucket holds enough (rate limit). After the call's record is written,
:meth:`BudgetGuard.settle` moves the reservation to the actual amount (zero for a failed
call or a replay). The overshoot bound this gives is in docs/design.md.

Budget definitions come from the config (``budgets.limits``) and the CLI (``paddle-meter
budgets set``), both stored in the ledger database; each process re-reads them every
``refresh_s``. A maintenance thread sweeps expired reservations and reconciles the
counters of the current periods with the ledger every ``reconcile_interval_s`` (and once
at start), so a restart or a crash never resets or inflates a budget's ``used``.

Fail closed: when a call falls under a budget or a rate limit and the store cannot be
reached, the call is refused ``unavailable``; calls under none never touch the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as _dt
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

from billing.budget_store import (
    BucketTake,
    BudgetStore,
    BudgetStoreError,
    Claim,
    Counter,
    Refused,
)
from billing.budgets import (
    Budget,
    RateLimits,
    budget_refusal_message,
    format_amount,
    metric_of_record,
    parse_budgets_config,
    parse_rate_limits,
)
from billing.periods import CalendarPeriod, calendar_period, load_zone
from exporters import semconv as sc
from exporters.ledger.schema import cost_to_micros, normalize_ts
from exporters.usage_record import UsageRecord
from models.usage import UsageEstimate
from serving.errors import ServingError

__all__ = ["BUDGET_UNAVAILABLE_MESSAGE", "BudgetGuard", "Reservation", "SoftCrossing"]

log = logging.getLogger(__name__)

BUDGET_UNAVAILABLE_MESSAGE: Final = (
    "the budget and rate-limit counters cannot be reached now; nothing was served; retry later"
)
_SWEEP_EVERY_S: Final = 5.0
_TTL_MARGIN_S: Final = 30.0
_NO_RATE_LIMITS: Final = RateLimits()
_GUARD_OPTIONS: Final = {
    "ocr_estimate_chars_per_image", "refresh_s", "reconcile_interval_s", "limits",
    "reservation_ttl_s",
}


@dataclasses.dataclass
class Reservation:
    """What one call holds: its claims on budgets and what it took from buckets."""

    reservation_id: str
    claims: list[Claim]
    takes: list[BucketTake]
    estimated_tokens: int


@dataclasses.dataclass(frozen=True)
class SoftCrossing:
    """A call's usage took a budget past its soft limit (raised once, by that call)."""

    budget: Budget
    used: int
    threshold: int
    period: CalendarPeriod

    def attributes(self, currency: str) -> dict[str, Any]:
        return {
            sc.PADDLE_METER_TENANT: self.budget.tenant,
            sc.PADDLE_METER_BUDGET_ID: self.budget.budget_id,
            sc.PADDLE_METER_BUDGET_METRIC: self.budget.metric,
            sc.PADDLE_METER_BUDGET_PERIOD: self.budget.period,
            "used": format_amount(self.budget.metric, self.used, currency),
            "limit": format_amount(self.budget.metric, self.budget.limit, currency),
            "soft": self.budget.soft or 0.0,
            "resets_at": self.period.describe_reset(),
        }


def _estimate_record(model: str, operation: str, tenant: str, key_id: str | None, ts: str,
                     input_tokens: int, characters: int, images: int,
                     pages: int = 0) -> UsageRecord:
    """A synthetic ok record of the estimated usage, to price it like the real one."""
    return UsageRecord(
        request_id="estimate", ts=ts, duration_ms=0.0, tenant=tenant, api_key_id=key_id,
        model=model, model_version="", operation=operation, protocol="", endpoint="",
        status="ok", input_tokens=input_tokens, output_tokens=characters,
        characters=characters, images=images, pages=pages,
        billable_tokens=input_tokens + characters,
    )


class BudgetGuard:
    """One per serving process; see the module docstring. Build with :meth:`from_config`."""

    def __init__(
        self,
        store: BudgetStore,
        *,
        timezone: str = "UTC",
        pricebook: Any | None = None,
        ocr_chars_per_image: int = 300,
        reservation_ttl_s: float = 90.0,
        refresh_s: float = 5.0,
        reconcile_interval_s: float = 60.0,
        config_budgets: Iterable[Budget] = (),
        rate_default: RateLimits = _NO_RATE_LIMITS,
        rate_overrides: Mapping[str, RateLimits] | None = None,
    ) -> None:
        self.store = store
        self.zone = load_zone(timezone)
        self.pricebook = pricebook
        self.currency = getattr(pricebook, "currency", "CNY")
        self.ocr_chars_per_image = ocr_chars_per_image
        self.reservation_ttl_s = reservation_ttl_s
        self.refresh_s = refresh_s
        self.reconcile_interval_s = reconcile_interval_s
        self._config_budgets = list(config_budgets)
        self._rate_default = rate_default
        self._rate_overrides = dict(rate_overrides or {})
        self._budgets: dict[str, list[Budget]] = {}
        # Last figures seen per budget id (the gauges read them): (budget, period, counter).
        self._figures: dict[str, tuple[Budget, CalendarPeriod, Counter]] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="budgets")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], ledger_url: str, pricebook: Any | None
    ) -> BudgetGuard | None:
        """From the ``budgets`` and ``rate_limits`` blocks; None for a JSONL ledger
        without any budget or limit configured. Raises ValueError on bad settings."""
        block = dict(config.get("budgets") or {})
        unknown = sorted(set(block) - _GUARD_OPTIONS)
        if unknown:
            raise ValueError(f"unknown budgets option(s) {unknown}; known: {sorted(_GUARD_OPTIONS)}")
        budgets = parse_budgets_config(block.get("limits"))
        rate_default, overrides = parse_rate_limits(config.get("rate_limits"))
        if ledger_url.startswith("jsonl://"):
            if budgets or rate_default.any or overrides:
                raise ValueError("budgets and rate limits need a SQLite or PostgreSQL ledger")
            return None
        per_image = block.get("ocr_estimate_chars_per_image", 300)
        if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 0:
            raise ValueError(f"budgets.ocr_estimate_chars_per_image: an integer >= 0, not {per_image!r}")
        ttl_s = block.get("reservation_ttl_s")
        if ttl_s is None:  # a call longer than its inference limit is already refused
            ttl_s = float(config.get("server", {}).get("request_timeout_s", 60)) + _TTL_MARGIN_S
        return cls(
            BudgetStore(ledger_url),
            timezone=config.get("billing", {}).get("timezone", "UTC"),
            pricebook=pricebook,
            ocr_chars_per_image=per_image,
            reservation_ttl_s=float(ttl_s),
            refresh_s=float(block.get("refresh_s", 5.0)),
            reconcile_interval_s=float(block.get("reconcile_interval_s", 60.0)),
            config_budgets=budgets,
            rate_default=rate_default,
            rate_overrides=overrides,
        )

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Store the config's budgets, sweep expired reservations, reconcile the current
        periods with the ledger, then keep doing so in a thread. Blocks; raises
        BudgetStoreError when the store cannot be reached (the server does not start)."""
        self.store.sync_config(self._config_budgets)
        self._refresh()
        self.store.sweep_expired(time.time())
        self._reconcile(None)
        self._thread = threading.Thread(target=self._maintain, name="budget-maintenance",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._executor.shutdown(wait=True)
        self.store.close()

    def _maintain(self) -> None:
        last_sweep = last_reconcile = last_refresh = time.monotonic()
        while not self._stop.wait(1.0):
            now = time.monotonic()
            try:
                if now - last_refresh >= self.refresh_s:
                    last_refresh = now
                    self._refresh()
                if now - last_sweep >= _SWEEP_EVERY_S:
                    last_sweep = now
                    swept = self.store.sweep_expired(time.time())
                    if swept:
                        self._reconcile(swept)
                if now - last_reconcile >= self.reconcile_interval_s:
                    last_reconcile = now
                    self._reconcile(None)
            except Exception as exc:  # the store may be down: try again next round
                log.warning("budget maintenance failed: %s", type(exc).__name__,
                            extra={"error_type": type(exc).__name__})

    def _refresh(self) -> None:
        by_tenant: dict[str, list[Budget]] = {}
        for budget in self.store.load():
            by_tenant.setdefault(budget.tenant, []).append(budget)
        self._budgets = by_tenant
        # Every worker reports every budget's figures, not just those its own calls moved
        # (a scrape reaches one worker).
        now = _dt.datetime.now(_dt.timezone.utc)
        figures = {}
        for budgets in by_tenant.values():
            for budget in budgets:
                period = self.period_of(budget, now)
                figures[budget.budget_id] = (budget, period, self.store.counter(budget, period))
        self._figures = figures

    def _reconcile(self, only: set[str] | None) -> None:
        """Reconcile the current period of every budget (``only``: of these ids)."""
        now = _dt.datetime.now(_dt.timezone.utc)
        for budgets in list(self._budgets.values()):
            for budget in budgets:
                if only is not None and budget.budget_id not in only:
                    continue
                period = calendar_period(budget.period, self.zone, now)
                self._figures[budget.budget_id] = (budget, period,
                                                   self.store.reconcile(budget, period))

    def period_of(self, budget: Budget, moment: _dt.datetime) -> CalendarPeriod:
        return calendar_period(budget.period, self.zone, moment)

    # -- per call ---------------------------------------------------------------------

    def rate_limits(self, key_id: str | None) -> RateLimits:
        if key_id is not None and key_id in self._rate_overrides:
            return self._rate_overrides[key_id]
        return self._rate_default

    def applies(self, tenant: str, key_id: str | None) -> bool:
        """Whether a call of (tenant, key) falls under any budget or rate limit (no I/O)."""
        if self.rate_limits(key_id).any:
            return True
        return any(b.applies_to(tenant, key_id) for b in self._budgets.get(tenant, ()))

    def _amounts(self, budget: Budget, estimate: UsageEstimate, characters: int,
                 cost_micros: int) -> int:
        return metric_of_record(
            budget.metric, ok=True, billable_tokens=estimate.input_tokens + characters,
            characters=characters, cost_micros=cost_micros,
        )

    async def reserve(
        self,
        *,
        tenant: str,
        key_id: str | None,
        model: str,
        operation: str,
        started_at: _dt.datetime,
        request_id: str,
        estimate: UsageEstimate,
    ) -> Reservation | None:
        """Reserve the call's estimated usage on every budget it falls under and take it
        from its key's buckets; None when nothing applies. Raises ServingError
        ``rate_limited`` (over a budget or a rate) or ``unavailable`` (store down)."""
        budgets = [b for b in self._budgets.get(tenant, ()) if b.applies_to(tenant, key_id)]
        limits = self.rate_limits(key_id)
        if not budgets and not limits.any:
            return None
        # Per page: a 10-page PDF reserves ten pages' worth (an image is one page).
        characters = max(estimate.pages, estimate.images) * self.ocr_chars_per_image
        ts = normalize_ts(started_at)
        cost_micros = 0
        if self.pricebook is not None and any(b.metric == "cost" for b in budgets):
            record = _estimate_record(model, operation, tenant, key_id, ts,
                                      estimate.input_tokens, characters, estimate.images,
                                      estimate.pages)
            cost_micros = cost_to_micros(self.pricebook.price(record)[1])
        claims = [
            Claim(b, self.period_of(b, started_at),
                  self._amounts(b, estimate, characters, cost_micros))
            for b in budgets
        ]
        holder = tenant if key_id is None else key_id
        takes = []
        tokens = estimate.input_tokens + characters
        if limits.requests_per_minute is not None:
            rpm = float(limits.requests_per_minute)
            takes.append(BucketTake(f"{holder}/rpm", rpm, rpm / 60.0, 1.0, "requests_per_minute"))
        if limits.tokens_per_minute is not None and tokens > 0:
            tpm = float(limits.tokens_per_minute)
            takes.append(
                BucketTake(f"{holder}/tpm", tpm, tpm / 60.0, min(float(tokens), tpm),
                           "tokens_per_minute")
            )
        reservation = Reservation(uuid.uuid4().hex, claims, takes, tokens)
        now = time.time()
        loop = asyncio.get_running_loop()
        try:
            refused, after = await loop.run_in_executor(
                self._executor,
                lambda: self.store.reserve(
                    claims, takes, reservation_id=reservation.reservation_id,
                    request_id=request_id, record_ts=ts,
                    expires_at=now + self.reservation_ttl_s, now=now,
                ),
            )
        except BudgetStoreError as exc:
            log.warning("budget reservation failed: %s", exc, extra={"tenant": tenant})
            raise ServingError("unavailable", BUDGET_UNAVAILABLE_MESSAGE) from None
        if refused is not None:
            raise self._refusal(refused, started_at)
        for claim in claims:
            self._figures[claim.budget.budget_id] = (
                claim.budget, claim.period, after[claim.budget.budget_id]
            )
        return reservation

    def _refusal(self, refused: Refused, started_at: _dt.datetime) -> ServingError:
        if refused.claim is not None:
            claim, counter = refused.claim, refused.counter
            message = budget_refusal_message(
                claim.budget, claim.period, used=counter.used, reserved=counter.reserved,
                needed=claim.amount, currency=self.currency,
            )
            wait_s = (claim.period.utc_end - started_at).total_seconds()
            return ServingError("rate_limited", message, retry_after_s=max(1.0, wait_s),
                                reason="budget_exceeded")
        take = refused.take
        unit = "requests" if take.kind == "requests_per_minute" else "billable tokens"
        message = (
            f"rate limit of {int(take.capacity):,} {unit} per minute reached for "
            f"{take.bucket.rsplit('/', 1)[0]}; retry in {math.ceil(refused.retry_after_s)} s"
        )
        return ServingError("rate_limited", message,
                            retry_after_s=max(1.0, refused.retry_after_s), reason=take.kind)

    async def settle(self, reservation: Reservation, record: UsageRecord | None) -> list[SoftCrossing]:
        """Replace the reservation by ``record``'s actual usage (None: the call billed
        nothing: it failed, was refused or replayed). Never raises: a failure is logged;
        the reservation then expires and the counter is reconciled with the ledger."""
        ok = record is not None and record.status == "ok"
        billable = record.billable_tokens if ok else 0
        actuals = [
            (claim, metric_of_record(
                claim.budget.metric, ok=ok, billable_tokens=billable,
                characters=record.characters if ok else 0,
                cost_micros=cost_to_micros(record.cost) if ok else 0,
            ))
            for claim in reservation.claims
        ]
        corrections = [
            (take, take.need - min(float(billable), take.capacity))
            for take in reservation.takes
            if take.kind == "tokens_per_minute"
        ]
        loop = asyncio.get_running_loop()
        try:
            after = await loop.run_in_executor(
                self._executor,
                lambda: self.store.settle(reservation.reservation_id, actuals, corrections),
            )
        except Exception as exc:
            log.warning("budget settlement failed: %s; the reservation expires and the counter "
                        "is reconciled with the ledger", type(exc).__name__,
                        extra={"error_type": type(exc).__name__})
            return []
        crossings = []
        for claim in reservation.claims:
            got = after.get(claim.budget.budget_id)
            if got is None:
                continue
            counter, actual = got
            self._figures[claim.budget.budget_id] = (claim.budget, claim.period, counter)
            threshold = claim.budget.soft_threshold
            if threshold is not None and counter.used - actual < threshold <= counter.used:
                crossing = SoftCrossing(claim.budget, counter.used, threshold, claim.period)
                log.warning(
                    "budget soft limit crossed: %s has used %s of %s",
                    claim.budget.who(),
                    format_amount(claim.budget.metric, counter.used, self.currency),
                    format_amount(claim.budget.metric, claim.budget.limit, self.currency),
                    extra={"event": sc.EVENT_BUDGET_SOFT_LIMIT, **crossing.attributes(self.currency)},
                )
                crossings.append(crossing)
        return crossings

    # -- visibility -------------------------------------------------------------------

    def figures(self) -> list[tuple[Budget, CalendarPeriod, Counter]]:
        """The last figures seen of every budget (the gauges' source; no I/O)."""
        now = _dt.datetime.now(_dt.timezone.utc)
        out = []
        for budget, period, counter in list(self._figures.values()):
            if period.utc_end <= now:  # a new period started: nothing used in it yet here
                period, counter = self.period_of(budget, now), Counter(0, 0)
            out.append((budget, period, counter))
        return out
