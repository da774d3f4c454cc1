"""The built-in metering dashboard (AI 计量仪表盘): ``GET /dashboard`` and its data.

``GET /dashboard`` is one self-contained page (billing/dashboard.html: its script and
styles inline, nothing fetched from any other host) with Chinese and English labels. It
holds no figures: every 5 s it reads ``GET /v1/dashboard``, which needs what ``/v1/usage``
needs (an auditor or admin key with ``auth.mode: required``, scoped to the key's tenant;
loopback only with auth off). The page asks for the key once and keeps it in the tab's
``sessionStorage`` (never in the URL, so never in a log).

The figures come from the ledger, as the bill does: the last minute from its raw records,
today and this month (days of ``billing.timezone``) by tenant and model from its minute
rollups (exact cost, in micro-units summed), with unit cost; latency percentiles of the last hour's records; budgets from the
budget tables; recent anomalies from the built-in detector's table (billing/anomalies.py).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import statistics
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from billing.anomalies import recent_anomalies
from billing.budget_view import budget_rows
from billing.periods import load_zone, utc_minute_key
from billing.usage_api import readable_tenant
from exporters.ledger.schema import normalize_ts

if TYPE_CHECKING:
    from auth.authenticator import Authenticator
    from billing.budget_store import BudgetStore
    from exporters.ledger.reader import LedgerReader

__all__ = ["dashboard_data", "make_dashboard_router"]

_PAGE = Path(__file__).with_name("dashboard.html")
_LATENCY_SAMPLE = 5000
_MICRO = Decimal("0.000001")


def _period_rows(reader: LedgerReader, lo: str, hi: str, tenant: str | None
                 ) -> list[dict[str, Any]]:
    """Per (tenant, model) over the UTC minute keys [lo, hi) of the rollups: exact sums."""
    filters, params = ("", ()) if tenant is None else (" AND tenant = ?", (tenant,))
    rows = reader.fetch_all(
        "SELECT tenant, model, SUM(requests), "
        "SUM(CASE WHEN status_class = 'ok' THEN 0 ELSE requests END), SUM(billable_tokens), "
        "SUM(characters), SUM(cost_micros) FROM usage_rollup_minute "
        f"WHERE minute >= ? AND minute < ?{filters} GROUP BY tenant, model "
        "ORDER BY tenant, model", (lo, hi, *params))
    out = []
    for tenant_, model, requests, errors, tokens, characters, micros in rows:
        requests, errors, tokens = int(requests or 0), int(errors or 0), int(tokens or 0)
        cost = Decimal(int(micros or 0)) * _MICRO
        billed = requests - errors
        out.append({
            "tenant": tenant_, "model": model, "requests": requests, "errors": errors,
            "billable_tokens": tokens, "characters": int(characters or 0),
            "cost": str(cost.quantize(_MICRO)),
            "cost_per_request": str((cost / billed).quantize(_MICRO)) if billed else None,
            "cost_per_1k_tokens": str((cost * 1000 / tokens).quantize(_MICRO)) if tokens else None,
        })
    return out


def dashboard_data(reader: LedgerReader, *, timezone: str, currency: str,
                   tenant: str | None = None, store: BudgetStore | None = None,
                   now: _dt.datetime | None = None) -> dict[str, Any]:
    """Everything the page shows; blocks on the database."""
    zone = load_zone(timezone)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    today = now.astimezone(zone).date()
    periods = {}
    for name, first in (("today", today), ("month", today.replace(day=1))):
        lo = utc_minute_key(first.isoformat(), zone)
        hi = utc_minute_key(today.isoformat(), zone, end=True)
        periods[name] = _period_rows(reader, lo, hi, tenant)
    since = normalize_ts(now - _dt.timedelta(seconds=60))
    hour = normalize_ts(now - _dt.timedelta(hours=1))
    filters, params = ("", ()) if tenant is None else (" AND tenant = ?", (tenant,))
    live = reader.fetch_all(
        "SELECT tenant, model, COUNT(*), COALESCE(SUM(billable_tokens), 0) FROM usage_records "
        f"WHERE ts >= ? AND status = 'ok'{filters} GROUP BY tenant, model ORDER BY tenant, model",
        (since, *params))
    durations = [float(r[0]) for r in reader.fetch_all(
        f"SELECT duration_ms FROM usage_records WHERE ts >= ?{filters} "
        f"ORDER BY ts DESC LIMIT {_LATENCY_SAMPLE}", (hour, *params))]
    latency = None
    if len(durations) >= 2:
        cuts = statistics.quantiles(durations, n=100, method="inclusive")
        latency = {"calls": len(durations), "p50_ms": round(cuts[49], 1),
                   "p95_ms": round(cuts[94], 1), "p99_ms": round(cuts[98], 1)}
    budgets = ([] if store is None else
               budget_rows(store, timezone=zone.key, currency=currency, tenant=tenant))
    return {
        "generated_at": now.astimezone(zone).isoformat(timespec="seconds"),
        "timezone": zone.key,
        "currency": currency,
        "last_minute": [{"tenant": t, "model": m, "requests": int(n), "billable_tokens": int(b),
                         "tokens_per_s": round(int(b) / 60, 2)} for t, m, n, b in live],
        "today": periods["today"],
        "month": periods["month"],
        "latency_last_hour": latency,
        "budgets": budgets,
        "anomalies": recent_anomalies(reader, tenant=tenant),
    }


def make_dashboard_router(
    get_reader: Callable[[], LedgerReader],
    authenticator: Authenticator | None,
    *,
    timezone: str,
    currency: str,
    get_store: Callable[[], BudgetStore | None] = lambda: None,
) -> APIRouter:
    """``GET /dashboard`` (the page) and ``GET /v1/dashboard?tenant=`` (its data)."""
    router = APIRouter()
    keyed = authenticator is not None and authenticator.required
    page = _PAGE.read_text(encoding="utf-8")

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"cache-control": "no-store",
                                           "content-security-policy": "default-src 'self'; "
                                           "script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'"})

    @router.get("/v1/dashboard")
    async def dashboard(request: Request, tenant: str | None = Query(None)) -> dict[str, Any]:
        tenant = readable_tenant(request, tenant, keyed)
        return await asyncio.to_thread(dashboard_data, get_reader(), timezone=timezone,
                                       currency=currency, tenant=tenant, store=get_store())

    return router
