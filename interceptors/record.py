"""Building the :class:`exporters.usage_record.UsageRecord` of a finished call.

Called by :meth:`interceptors.call.MeteredCall.finish` for billable calls only, before
pricing (interceptors/billing_policy.py) and the ledger write. Pure: reads the call's
state, never raises for well-formed input, writes nothing.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from exporters.usage_record import UsageRecord
from interceptors.billing_policy import billed_tokens

if TYPE_CHECKING:
    from interceptors.call import MeteredCall

__all__ = ["build_record"]


def build_record(
    call: MeteredCall,
    *,
    status: str,
    ok: bool,
    duration_s: float,
    request_bytes: int,
    response_bytes: int,
    record_content: bool,
) -> UsageRecord:
    """The ledger row of ``call``: ``status`` is "ok" or the error code; ``ok`` decides the
    billable tokens; ``content`` is kept only with ``record_content``."""
    usage = call.usage
    ctx = call.span.get_span_context()
    ts = datetime.datetime.fromtimestamp(call.start_wall_ns / 1e9, datetime.timezone.utc)
    billed_in, billed_out = billed_tokens(usage, ok)
    return UsageRecord(
        request_id=call.request_id,
        ts=ts.isoformat(),
        duration_ms=round(duration_s * 1000.0, 3),
        tenant=call.tenant,
        api_key_id=call.api_key_id,
        model=usage.model or "",
        model_version=usage.model_version or "",
        operation=usage.operation or "",
        protocol=call.protocol,
        endpoint=call.endpoint,
        status=status,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        characters=usage.characters,
        images=usage.images,
        pages=usage.pages,
        billable_tokens=billed_in + billed_out,
        request_bytes=request_bytes,
        response_bytes=response_bytes,
        trace_id=format(ctx.trace_id, "032x") if ctx.is_valid else None,
        span_id=format(ctx.span_id, "016x") if ctx.is_valid else None,
        content_sha256=usage.content_sha256,
        content=usage.content if record_content else None,
        truncated=usage.truncated,
    )
