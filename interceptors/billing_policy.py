"""Billing policy: what is billable, billed tokens, pricing, idempotency, failing closed.

The one home of these decisions; interceptors/core.py applies the start-time ones and
interceptors/call.py the rest when a call finishes.

- A call is billable (gets a ledger record) when the frontend named a model and the
  operation is not one of :data:`NON_BILLABLE_OPERATIONS`: bills only carry model calls.
- Only a successful call bills its tokens; an error, including an application error
  (``usage.app_status``), is recorded with zero billable tokens.
- A record is priced by the operator's price book when it is built; a pricing failure is
  counted and the record is written unpriced (priced later from its token counts).
- Idempotency (:func:`settle`): the billing key is (tenant, request id), and the ledger
  keeps at most one ok record per key. A successful call whose key is already billed is a
  *replay* when its payload (``content_sha256``) is the billed one and the key has been
  replayed at most ``max_replays`` times: it is served, reports the ORIGINAL billed usage
  to the caller, and adds nothing to the token metrics. Otherwise it is *refused*
  (``already_exists``): a different payload under a used id, or too many replays.
- Fail closed: a call that cannot be metered is not served. At start (core.py): a
  malformed id/tenant header (``invalid_argument``), a ledger that can accept nothing
  (:data:`LEDGER_CANNOT_ACCEPT_MESSAGE`), or any failure while starting
  (:data:`START_FAILURE_MESSAGE`); at finish: a billable call whose record cannot be made
  durable (:data:`LEDGER_FAILURE_MESSAGE`). Refusals are ServingErrors; transports answer
  them with the kind's gRPC code / HTTP status, and nothing of the handler's result leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from exporters import semconv as sc
from exporters.usage_record import UsageRecord
from models.usage import RequestUsage
from serving.errors import ServingError, grpc_code, http_status

if TYPE_CHECKING:
    from exporters.ledger.base import BilledRecord, WriteOutcome

__all__ = [
    "DEFAULT_MAX_REPLAYS",
    "LEDGER_CANNOT_ACCEPT_MESSAGE",
    "LEDGER_FAILURE_MESSAGE",
    "NON_BILLABLE_OPERATIONS",
    "START_FAILURE_MESSAGE",
    "Settlement",
    "billed_tokens",
    "is_billable",
    "price_record",
    "refusal_status",
    "rendered_by_frontend",
    "settle",
]

LEDGER_FAILURE_MESSAGE: Final = "usage could not be recorded; retry with the same x-request-id"
LEDGER_CANNOT_ACCEPT_MESSAGE: Final = (
    "the usage ledger can accept no records now; nothing was served; retry later"
)
START_FAILURE_MESSAGE: Final = "metering could not start; nothing was served; retry"
DEFAULT_MAX_REPLAYS: Final = 10
# Operations that are never billed: such calls get spans and metrics, no ledger record.
# "tokenize": the counting service estimates cost before a call; it must not cost anything.
NON_BILLABLE_OPERATIONS: Final = frozenset({"health", "reflection", "metadata", "tokenize"})
# Refusals about the transport's state, not the request's content: answered with the
# transport's own status (UNAVAILABLE / 503) even on the pipeline, so gRPC retry policies,
# load balancers and HTTP clients see and retry them.
_TRANSPORT_KINDS: Final = frozenset({"unavailable", "overloaded"})
_STATUS_ATTRIBUTE: Final = {
    "grpc": sc.RPC_GRPC_STATUS_CODE,
    "http": sc.HTTP_RESPONSE_STATUS_CODE,
}


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


@dataclasses.dataclass(frozen=True, slots=True)
class Settlement:
    """What the ledger's answer means for a call: billed now, a replay, or refused."""

    replay: BilledRecord | None = None  # the figures billed the first time
    refusal: ServingError | None = None


_BILLED_NOW: Final = Settlement()


def settle(record: UsageRecord, outcome: WriteOutcome | None, max_replays: int) -> Settlement:
    """Judge ``outcome`` (the ledger's answer to writing ``record``; None: no ledger).

    Only an ok record the ledger did not insert because its key is already billed
    (``outcome.existing``) can be a replay or a refusal; anything else is billed now.
    """
    existing = outcome.existing if outcome is not None else None
    if existing is None:
        return _BILLED_NOW
    if existing.content_sha256 != record.content_sha256:
        return Settlement(refusal=ServingError("already_exists", (
            f"x-request-id {record.request_id!r} was already used by tenant {record.tenant!r}"
            " for a different payload; send a new x-request-id"
        )))
    if outcome.replays > max_replays:
        return Settlement(refusal=ServingError("already_exists", (
            f"x-request-id {record.request_id!r} of tenant {record.tenant!r} was already"
            f" replayed {max_replays} times (metering.max_replays); send a new x-request-id"
        )))
    return Settlement(replay=existing)


def refusal_status(protocol: str, kind: str) -> tuple[str, str, int]:
    """A refused call's (metric/record status, transport status attribute, its value):
    ``("ALREADY_EXISTS", "rpc.grpc.status_code", 6)``, ``("409", "http...", 409)``."""
    if protocol == "grpc":
        code = grpc_code(kind)
        return code.name, _STATUS_ATTRIBUTE["grpc"], code.value[0]
    status = http_status(kind)
    return str(status), _STATUS_ATTRIBUTE["http"], status


def rendered_by_frontend(usage: RequestUsage, refusal: ServingError) -> Any | None:
    """The frontend's own answer to ``refusal`` (``usage.error_renderer``), or None: the
    transport then answers with the kind's status. Raises what the renderer raises."""
    renderer = usage.error_renderer
    if renderer is None or refusal.kind in _TRANSPORT_KINDS:
        return None
    return renderer(refusal.kind, refusal.message)
