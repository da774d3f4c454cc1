"""What a metered call tells its caller: ``x-request-id`` and the billed token counts.

A replay (interceptors/billing_policy.py) reports the counts billed the first time and
``x-usage-replay: true``, so what a caller is told always matches the ledger.

Sent as gRPC trailing metadata (interceptors/grpc_aio.py) or HTTP response headers
(interceptors/asgi.py), after :meth:`interceptors.call.MeteredCall.finish`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from exporters import semconv as sc
from interceptors.billing_policy import billed_tokens, is_billable

if TYPE_CHECKING:
    from interceptors.call import MeteredCall

__all__ = ["usage_metadata"]


def usage_metadata(call: MeteredCall) -> list[tuple[str, str]]:
    """``(name, value)`` pairs for the caller; only a successful, finished call reports
    billed tokens (0 otherwise).

    A call that is neither billable nor carries usage (health, metadata, ServerLive) gets
    only the echo of an id the request carried, or nothing: zero-token trailers and a
    random id tell the caller nothing and cost gRPC metadata work per call.
    """
    usage = call.usage
    if not (is_billable(usage) or usage.input_tokens or usage.output_tokens):
        carried = call.header_request_id is not None or usage.request_id is not None
        return [(sc.HEADER_REQUEST_ID, call.request_id)] if carried else []
    replay = call.replay
    if replay is not None:
        return [
            (sc.HEADER_REQUEST_ID, call.request_id),
            (sc.HEADER_USAGE_INPUT_TOKENS, str(replay.input_tokens)),
            (sc.HEADER_USAGE_OUTPUT_TOKENS, str(replay.output_tokens)),
            (sc.HEADER_USAGE_REPLAY, "true"),
        ]
    billed_in, billed_out = billed_tokens(usage, call.ok)
    return [
        (sc.HEADER_REQUEST_ID, call.request_id),
        (sc.HEADER_USAGE_INPUT_TOKENS, str(billed_in)),
        (sc.HEADER_USAGE_OUTPUT_TOKENS, str(billed_out)),
    ]
