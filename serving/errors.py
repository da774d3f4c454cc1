"""One error type for every frontend, and its mapping to each protocol's way of failing.

Frontends raise :class:`ServingError` (or get a :class:`models.base.ModelError` back from an
adapter); the protocol layer turns it into a gRPC status, an HTTP status with OIP's
``{"error": "..."}`` body, or a Paddle Serving pipeline ``err_no`` / ``err_msg``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import grpc

from models.base import ModelError
from models.usage import current_usage

__all__ = [
    "ServingError",
    "as_serving_error",
    "grpc_code",
    "grpc_trailers",
    "http_headers",
    "http_status",
    "log_internal",
    "pipeline_err_no",
    "RETRY_AFTER_S",
    "WWW_AUTHENTICATE",
    "unknown_model",
]


class ServingError(Exception):
    """A request that cannot be served; ``kind`` picks the status, ``message`` is for people.

    ``retry_after_s``: when the caller may retry (HTTP ``Retry-After``, gRPC trailing
    metadata ``retry-after``); None leaves the kind's default (:func:`http_headers`).
    ``reason``: a short machine word for metrics (e.g. an authentication failure's
    ``unknown_key``); never shown in place of ``message``.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retry_after_s: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s
        self.reason = reason


log = logging.getLogger(__name__)

# Longest x-request-id put into a log line (the metering policy refuses longer ones; with
# metering off nothing checked it).
_MAX_LOGGED_ID = 128

#: seconds a client is told to wait before retrying an HTTP 503 (``Retry-After``) or a gRPC
#: RESOURCE_EXHAUSTED / UNAVAILABLE answer (trailing metadata ``retry-after``)
RETRY_AFTER_S = 1

_GRPC = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "internal": grpc.StatusCode.INTERNAL,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_HTTP = {
    "invalid_argument": 400,
    "not_found": 404,
    "resource_exhausted": 413,
    "deadline_exceeded": 504,
    "unavailable": 503,
    "unimplemented": 501,
    "internal": 500,
    "already_exists": 409,
    "overloaded": 503,  # with Retry-After (RETRY_AFTER_S): back-pressure, not a size limit
    "unauthenticated": 401,  # with WWW-Authenticate: Bearer
    "permission_denied": 403,
    "rate_limited": 429,  # with Retry-After
}
# Paddle Serving 0.9's CustomExceptionCode (pipeline/error_catch.py), so its clients' checks hold.
_PIPELINE = {
    "invalid_argument": 5000,  # INPUT_PARAMS_ERROR
    "not_found": 3002,  # NO_SERVICE
    "resource_exhausted": 5000,
    "deadline_exceeded": 6000,  # TIMEOUT
    "unavailable": 3001,  # CLOSED_ERROR
    "unimplemented": 3000,  # NOT_IMPLEMENTED
    "internal": 10000,  # UNKNOW
    "already_exists": 5000,  # INPUT_PARAMS_ERROR: the caller reused a request id
    "overloaded": 3001,  # CLOSED_ERROR, as Paddle Serving answers when it cannot take work
    # Paddle Serving 0.9 has no authentication codes: ours, outside its CustomExceptionCode
    # values, shaped after the HTTP statuses (documented in docs/design.md).
    "unauthenticated": 4001,
    "permission_denied": 4003,
    "rate_limited": 4029,
}


def unknown_model(name: str, served_names: Iterable[str]) -> ServingError:
    """The one error for a request naming a model this server does not serve, on every
    surface. It starts with Paddle Serving's own words for the pipeline case ("Service name
    error"), then names the model and what is served instead; kind ``not_found``."""
    served = ", ".join(served_names) or "none"
    return ServingError(
        "not_found", f"Service name error: unknown model {name!r}; this server serves: {served}"
    )


def as_serving_error(exc: BaseException) -> ServingError:
    """Normalise whatever a request raised or an adapter returned into a ServingError."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, ModelError):
        return ServingError(exc.kind, str(exc))
    if isinstance(exc, TimeoutError):
        return ServingError("deadline_exceeded", "inference took longer than the server's limit")
    return ServingError("internal", f"internal error: {type(exc).__name__}")


def log_internal(exc: BaseException, request_id: str | None, **fields: Any) -> None:
    """Log a request that will be answered 500 / INTERNAL / err_no 10000: ERROR, with the
    traceback (the ServingError's cause chain) and the caller's request id, so the one
    failed call can be found. Every such path on the OIP and pipeline surfaces calls this.
    Without an x-request-id the id metering gave the call (its ledger key) is logged."""
    if not request_id and (usage := current_usage()) is not None:
        request_id = usage.request_id
    log.error(
        "request failed with an internal error",
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"request_id": (request_id or "")[:_MAX_LOGGED_ID] or None, **fields},
    )


def grpc_code(kind: str) -> grpc.StatusCode:
    return _GRPC.get(kind, grpc.StatusCode.INTERNAL)


def http_status(kind: str) -> int:
    return _HTTP.get(kind, 500)


#: the ``WWW-Authenticate`` challenge of every 401 (RFC 6750)
WWW_AUTHENTICATE = 'Bearer realm="paddle-meter"'


def _retry_after(error: str | ServingError) -> str | None:
    if isinstance(error, ServingError):
        if error.retry_after_s is not None:
            return str(max(1, math.ceil(error.retry_after_s)))
        error = error.kind
    return str(RETRY_AFTER_S) if http_status(error) in (429, 503) else None


def http_headers(error: str | ServingError) -> dict[str, str]:
    """Extra headers for an HTTP error answer (a kind or the error itself): every 503 and
    429 says ``Retry-After`` (the error's own ``retry_after_s`` when set), every 401
    ``WWW-Authenticate: Bearer``."""
    kind = error.kind if isinstance(error, ServingError) else error
    headers: dict[str, str] = {}
    retry = _retry_after(error)
    if retry is not None:
        headers["Retry-After"] = retry
    if kind == "unauthenticated":
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return headers


def grpc_trailers(error: str | ServingError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for a gRPC error: ``retry-after`` where HTTP sends Retry-After."""
    retry = _retry_after(error)
    return (("retry-after", retry),) if retry is not None else ()


def pipeline_err_no(kind: str) -> int:
    return _PIPELINE.get(kind, 10000)
