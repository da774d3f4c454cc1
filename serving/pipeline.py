"""The Paddle Serving 0.9 pipeline protocol, shared by its gRPC and its HTTP transport.

Request.name picks the model (empty: the first configured one, as a one-service Paddle
Serving server accepts an empty name); key/value pairs (or tensors with ``str_data`` /
``byte_data``) carry the inputs, and may carry the API key as the feed key ``api_key``
(Paddle Serving's PipelineClient cannot send headers): it is removed before anything else
sees the fields and handed to the metering core (``usage.credential_hook``). Failures are answered the Paddle Serving way, with the
transport saying OK and ``err_no`` / ``err_msg`` set, so its clients' error checks work
unchanged. The transports (serving/pipeline_grpc.py, serving/http_app.py) only parse their
wire form, call :func:`answer_pipeline` and frame the :class:`PipelineReply`; each also
sets ``usage.error_renderer`` to frame :func:`error_reply`, so a call metering refuses
after it ran (an idempotency conflict) is answered the pipeline way too.

An unknown ``name`` is refused by the model lookup in serving/dispatch.py (err_no 3002,
no ledger row); a failure before the lookup (bad key/value pairs) is recorded against the
model only when that model is served.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from auth.authenticator import PIPELINE_KEY_FIELD
from models.usage import current_usage
from serving.dispatch import run_model, tokenize
from serving.errors import ServingError, as_serving_error, log_internal, pipeline_err_no
from serving.model_host import ModelHost

__all__ = ["PipelineReply", "answer_pipeline", "error_reply"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineReply:
    err_no: int = 0
    err_msg: str = ""
    keys: list[str] = dataclasses.field(default_factory=list)
    values: list[str] = dataclasses.field(default_factory=list)


def error_reply(kind: str, message: str) -> PipelineReply:
    """The reply for a failure of ``kind`` (serving/errors.py): err_no set, no fields."""
    return PipelineReply(pipeline_err_no(kind), message)


def _fields(keys: Sequence[Any], values: Sequence[Any], tensors: Sequence[Any]) -> dict[str, str]:
    """Pair keys with values (and tensors by name); raises ServingError on a mismatch."""
    if not all(isinstance(v, Sequence) and not isinstance(v, str | bytes) for v in (keys, values)):
        raise ServingError("invalid_argument", "'key' and 'value' must be lists of strings")
    if len(keys) != len(values):
        raise ServingError(
            "invalid_argument", f"{len(keys)} keys but {len(values)} values; send one value per key"
        )
    fields: dict[str, str] = {}
    for key, value in zip(keys, values, strict=True):
        if not isinstance(key, str) or not isinstance(value, str):
            raise ServingError("invalid_argument", f"key {key!r}: keys and values must be strings")
        if key in fields:
            raise ServingError("invalid_argument", f"key {key!r} is sent twice")
        fields[key] = value
    for tensor in tensors:
        if tensor.str_data:
            fields[tensor.name] = tensor.str_data[0]
        elif tensor.byte_data:
            fields[tensor.name] = tensor.byte_data.decode("ascii", errors="replace")
    return fields


def _failure(error: ServingError, model: str | None) -> PipelineReply:
    """The err_no reply for ``error``, marking the metered call failed (transport says OK)
    and recording it against ``model`` (a served model or None) so the failed call is in
    the ledger, unbilled."""
    reply = error_reply(error.kind, error.message)
    if (usage := current_usage()) is not None:
        usage.app_status = f"err_no={reply.err_no}"
        if usage.model is None and model:
            usage.model = model
    return reply


async def _serve(
    host: ModelHost, model_name: str, method: str, fields: Mapping[str, str], logid: int
) -> PipelineReply:
    if method == "tokenize":
        counted = await tokenize(host, model_name, fields.get("text"), fields.get("text_pair"))
        keys = ["input_ids", "token_type_ids", "count", "truncated"]
        return PipelineReply(0, "", keys, [json.dumps(counted[k]) for k in keys])
    served, results = await run_model(
        host,
        model_name,
        lambda codec: codec.from_pipeline(fields),
        request_id=str(logid) if logid else None,
    )
    out = served.codec.to_pipeline(results)
    return PipelineReply(0, "", list(out), list(out.values()))


def _present_key(key: str | None) -> None:
    """Hand the feed key ``api_key`` to the metering core when it waits for one (the
    PipelineClient cannot send headers); raises its refusal (ServingError)."""
    usage = current_usage()
    if usage is not None and usage.credential_hook is not None:
        usage.credential_hook(key)


def _unauthenticated_first(error: ServingError) -> ServingError:
    """A request that failed before presenting its key (bad key/value lists) is answered
    as unauthenticated when it had no key: a caller without one learns nothing more."""
    try:
        _present_key(None)
    except ServingError as refusal:
        return refusal
    return error


async def answer_pipeline(
    host: ModelHost,
    name: str,
    method: str,
    keys: Sequence[Any],
    values: Sequence[Any],
    tensors: Sequence[Any] = (),
    logid: int = 0,
    *,
    caller_request_id: str | None = None,
) -> PipelineReply:
    """Answer one pipeline request; never raises for a bad request, it answers err_no instead.

    ``tensors`` are pipeline Tensor messages (``name``, ``str_data``, ``byte_data``).
    ``method`` ``tokenize`` counts tokens without inference (ERNIE models); any other method
    segment runs the model, as Paddle Serving's gateway accepts any. ``caller_request_id``
    (the x-request-id header) goes into the log line of an internal error."""
    model_name = name or host.default_name() or ""
    try:
        fields = _fields(keys, values, tensors)
        # Removed whatever the auth mode: the model never sees a key, nor does the ledger.
        _present_key(fields.pop(PIPELINE_KEY_FIELD, None))
        return await _serve(host, model_name, method, fields, logid)
    except Exception as exc:
        error = _unauthenticated_first(as_serving_error(exc))
        if error.kind == "internal":
            log_internal(exc, caller_request_id, surface="pipeline", model=model_name)
        return _failure(error, model_name if model_name in host.names() else None)
