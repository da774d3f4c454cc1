"""``GET /v1/usage``: the usage report as JSON, for dashboards and Power BI web sources.

``make_usage_router(get_ledger_reader)`` returns a FastAPI APIRouter; the server mounts
it on its HTTP app. Until authentication exists, the route answers loopback clients only
(403 otherwise): usage per tenant is commercially sensitive. The handler is a plain
``def``, so FastAPI runs the blocking database query in its thread pool.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request

from billing.output import report_to_json
from billing.report import build_report, parse_by
from exporters.ledger.reader import LedgerReader

__all__ = ["is_loopback", "make_usage_router"]


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def make_usage_router(get_ledger_reader: Callable[[], LedgerReader]) -> APIRouter:
    """Router with ``GET /v1/usage?from=&to=&by=&tenant=&model=&period=``."""
    router = APIRouter()

    @router.get("/v1/usage")
    def usage(
        request: Request,
        start: str = Query(..., alias="from", description="UTC start, YYYY-MM-DD or ISO"),
        end: str = Query(..., alias="to", description="UTC end (bare date: inclusive)"),
        by: str = Query("tenant,model"),
        tenant: str | None = Query(None),
        model: str | None = Query(None),
        period: str = Query("day"),
    ) -> dict[str, Any]:
        if not is_loopback(request.client.host if request.client else None):
            raise HTTPException(status_code=403, detail="usage API is loopback-only")
        try:
            dims = parse_by(by)
            rows = build_report(get_ledger_reader(), start=start, end=end, period=period,
                                by=dims, tenant=tenant, model=model)
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {"from": start, "to": end, "period": period, "by": list(dims),
                "rows": report_to_json(rows)}

    return router
