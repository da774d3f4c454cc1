"""``GET /v1/usage``: the usage report as JSON, for dashboards and Power BI web sources.

``make_usage_router(get_ledger_reader, authenticator)`` returns a FastAPI APIRouter; the
server mounts it on its HTTP app. Usage per tenant is commercially sensitive:

- ``auth.mode: required``: the metering core admits only auditor and admin keys here
  (auth/roles.py); an auditor of one tenant reads that tenant only, whatever it asks
  (another ``tenant=`` is 403), an auditor of ``*`` and an admin read every tenant;
- ``auth.mode: off``: loopback clients only (403 otherwise).

The blocking database query runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Query, Request

from auth.context import current_identity
from auth.roles import Permission
from billing.output import report_to_json
from billing.periods import load_zone
from billing.report import build_report, parse_by
from exporters.ledger.reader import LedgerReader

if TYPE_CHECKING:
    from auth.authenticator import Authenticator

__all__ = ["is_loopback", "make_usage_router", "readable_tenant"]


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def readable_tenant(request: Request, tenant: str | None, keyed: bool) -> str | None:
    """The tenant filter this caller may use on a usage-like read (usage, bills,
    budgets), as the module docstring says; raises HTTPException 403."""
    if not keyed:
        if not is_loopback(request.client.host if request.client else None):
            raise HTTPException(status_code=403, detail="usage API is loopback-only")
        return tenant
    identity = current_identity()
    if identity is None or not identity.may(Permission.READ_USAGE):
        raise HTTPException(status_code=403, detail="usage needs an auditor or admin key")
    if identity.reads_all_tenants:
        return tenant
    if tenant is not None and tenant != identity.tenant:
        raise HTTPException(
            status_code=403, detail=f"this key may read tenant {identity.tenant} only"
        )
    return identity.tenant


def make_usage_router(
    get_ledger_reader: Callable[[], LedgerReader],
    authenticator: Authenticator | None = None,
    *,
    timezone: str = "UTC",
) -> APIRouter:
    """Router with ``GET /v1/usage?from=&to=&by=&tenant=&model=&period=&tz=``; periods are
    days of ``tz``, default ``timezone`` (``billing.timezone``)."""
    router = APIRouter()
    keyed = authenticator is not None and authenticator.required

    @router.get("/v1/usage")
    async def usage(
        request: Request,
        start: str = Query(..., alias="from", description="UTC start, YYYY-MM-DD or ISO"),
        end: str = Query(..., alias="to", description="UTC end (bare date: inclusive)"),
        by: str = Query("tenant,model"),
        tenant: str | None = Query(None),
        model: str | None = Query(None),
        period: str = Query("day"),
        tz: str | None = Query(None, description="IANA time zone of the periods"),
    ) -> dict[str, Any]:
        tenant = readable_tenant(request, tenant, keyed)
        zone = tz or timezone
        try:
            dims = parse_by(by)
            rows = await asyncio.to_thread(
                lambda: build_report(get_ledger_reader(), start=start, end=end, period=period,
                                     by=dims, tenant=tenant, model=model, tz=zone)
            )
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {"from": start, "to": end, "period": period, "timezone": load_zone(zone).key,
                "by": list(dims),
                "rows": report_to_json(rows)}

    return router
