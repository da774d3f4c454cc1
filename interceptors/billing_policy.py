"""Billing policy: what is billable, how many tokens are billed, pricing, and failing closed.

The one home of these decisions; interceptors/call.py applies them when a call finishes.

- A call is billable (gets a ledger record) when the frontend named a model and the
  operation is not one of :data:`NON_BILLABLE_OPERATIONS`: bills only carry model calls.
- Only a successful call bills its tokens; an error, including an application error
  (``usage.app_status``), is recorded with zero billable tokens.
- A record is priced by the operator's price book when it is built; a pricing failure is
  counted and the record is written unpriced (priced later from its token counts).
- Fail closed: a billable call whose record cannot be made durable fails the request
  (:data:`LEDGER_FAILURE`, :data:`LEDGER_FAILURE_MESSAGE`): never served but unbilled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from exporters import semconv as sc
from exporters.usage_record import UsageRecord
from models.usage import RequestUsage

__all__ = [
    "LEDGER_FAILURE",
    "LEDGER_FAILURE_MESSAGE",
    "NON_BILLABLE_OPERATIONS",
    "billed_tokens",
    "is_billable",
    "price_record",
]

LEDGER_FAILURE_MESSAGE: Final = "usage could not be recorded; retry with the same x-request-id"
# What the caller sees when the ledger write fails, per protocol: (status, attribute, value).
LEDGER_FAILURE: Final[dict[str, tuple[str, str, int]]] = {
    "grpc": ("UNAVAILABLE", sc.RPC_GRPC_STATUS_CODE, 14),
    "http": ("503", sc.HTTP_RESPONSE_STATUS_CODE, 503),
}
# Operations that are never billed: such calls get spans and metrics, no ledger record.
# "tokenize": the counting service estimates cost before a call; it must not cost anything.
NON_BILLABLE_OPERATIONS: Final = frozenset({"health", "reflection", "metadata", "tokenize"})


def is_billable(usage: RequestUsage) -> bool:
    """Whether the call belongs in the ledger: model calls only, never health etc."""
    return usage.model is not None and usage.operation not in NON_BILLABLE_OPERATIONS


def billed_tokens(usage: RequestUsage, ok: bool) -> tuple[int, int]:
    """(input, output) tokens billed: the reported counts when ``ok``, else zero."""
    return (usage.input_tokens, usage.output_tokens) if ok else (0, 0)


def price_record(
    record: UsageRecord,
    pricebook: Any | None,
    on_error: Callable[[str, BaseException, str | None], None],
) -> None:
    """Set ``record.price_id`` / ``record.cost`` from ``pricebook`` (None: left unpriced).

    Never raises: a failure is reported through ``on_error("pricing", exc, request_id)``.
    """
    if pricebook is None:
        return
    try:
        record.price_id, record.cost = pricebook.price(record)
    except Exception as exc:  # priced later from the ledger's token counts
        on_error("pricing", exc, record.request_id)
