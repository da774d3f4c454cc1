"""The one path from a decoded request to model results, shared by all five frontends
(OIP gRPC and REST, the pipeline over gRPC and HTTP, PaddleX's /ocr).

It looks the model up first: a name this server does not serve is answered ``not_found``
before the metering context hears of it, so it writes no ledger row and adds no ``model``
metric label value (anyone could otherwise grow both without limit). For a served model it
then tells the metering context what is being served (model, version, operation, the
protocol-level request id, a digest of the payload) before running the model, so even a
request that fails to decode is recorded against the model it asked for. Between decoding
and inference the metering context's admission hook (budgets and rate limits) reserves
the call's usage or refuses it: no model work is done for a refused call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from interceptors.model_statistics import timed
from models.usage import current_usage
from serving.codecs.base import Codec, digest
from serving.model_host import ModelHost, ServedModel

__all__ = ["run_model", "tokenize"]

Decoder = Callable[[Codec], tuple[list[Any], Sequence[bytes]]]


async def run_model(
    host: ModelHost, name: str, decode: Decoder, *, request_id: str | None = None
) -> tuple[ServedModel, list[Any]]:
    """Decode with the model's codec and infer; raises ServingError for anything bad."""
    served = host.get(name)  # first: an unknown name must reach neither ledger nor metrics
    usage = current_usage()
    if usage is not None:
        usage.model = name
        if request_id:
            usage.request_id = request_id
        usage.model_version = served.version
        usage.operation = served.operation
    with timed("compute_input"):
        items, payloads = decode(served.codec)
    if usage is not None:
        usage.content_sha256 = digest(payloads)
        if usage.admission_hook is not None:  # budgets / rate limits: reserve or refuse
            await usage.admission_hook(served, items)
    results = await served.run(items)
    if usage is not None:
        usage.content = served.codec.content(items, results)
    return served, results


async def tokenize(host: ModelHost, name: str, text: Any, text_pair: Any = None) -> dict[str, Any]:
    """Count a text's tokens exactly as the model would bill them, without running it.

    Metered as operation ``tokenize``, which is never billed: it is how callers estimate a
    cost before they pay it. Raises ServingError (unknown model, no tokenizer, bad text).
    """
    served = host.get(name)  # first, as in run_model
    usage = current_usage()
    if usage is not None:
        usage.model, usage.operation = name, "tokenize"
    counted = await served.count_tokens(text, text_pair)
    return {
        "model": name,
        "input_ids": counted.input_ids,
        "token_type_ids": counted.token_type_ids,
        "count": counted.count,
        "truncated": counted.truncated,
        "max_seq_len": counted.max_seq_len,
    }
