"""The one path from a decoded request to model results, shared by all four frontends.

It tells the metering context what is being served (model, version, operation, the
protocol-level request id, a digest of the payload) before running the model, so even a
request that fails to decode is recorded against the model it asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from models.usage import current_usage
from serving.codecs.base import Codec, digest
from serving.model_host import ModelHost, ServedModel

__all__ = ["run_model"]

Decoder = Callable[[Codec], tuple[list[Any], Sequence[bytes]]]


async def run_model(
    host: ModelHost, name: str, decode: Decoder, *, request_id: str | None = None
) -> tuple[ServedModel, list[Any]]:
    """Decode with the model's codec and infer; raises ServingError for anything bad."""
    usage = current_usage()
    if usage is not None:
        usage.model = name
        if request_id:
            usage.request_id = request_id
    served = host.get(name)
    if usage is not None:
        usage.model_version = served.version
        usage.operation = served.operation
    items, payloads = decode(served.codec)
    if usage is not None:
        usage.content_sha256 = digest(payloads)
    results = await served.run(items)
    if usage is not None:
        usage.content = served.codec.content(results)
    return served, results
