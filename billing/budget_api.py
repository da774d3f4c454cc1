"""``GET /v1/budgets``: where each budget stands, scoped as ``/v1/usage`` is.

An auditor of one tenant sees that tenant's budgets only (another ``tenant=`` is 403); an
auditor of ``*`` and an admin see all; with ``auth.mode: off``, loopback clients only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request

from billing.budget_view import budget_rows
from billing.usage_api import readable_tenant

if TYPE_CHECKING:
    from auth.authenticator import Authenticator
    from billing.budget_store import BudgetStore

__all__ = ["make_budgets_router"]


def make_budgets_router(
    get_store: Callable[[], BudgetStore],
    authenticator: Authenticator | None,
    *,
    timezone: str,
    currency: str,
) -> APIRouter:
    """Router with ``GET /v1/budgets?tenant=``; the blocking reads run in a thread."""
    router = APIRouter()
    keyed = authenticator is not None and authenticator.required

    @router.get("/v1/budgets")
    async def budgets(request: Request, tenant: str | None = Query(None)) -> dict[str, Any]:
        tenant = readable_tenant(request, tenant, keyed)
        rows = await asyncio.to_thread(
            budget_rows, get_store(), timezone=timezone, currency=currency, tenant=tenant
        )
        return {"timezone": timezone, "currency": currency, "budgets": rows}

    return router
