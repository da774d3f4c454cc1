"""One error type for every frontend, and its mapping to each protocol's way of failing.

Frontends raise :class:`ServingError` (or get a :class:`models.base.ModelError` back from an
adapter); the protocol layer turns it into a gRPC status, an HTTP status with OIP's
``{"error": "..."}`` body, or a Paddle Serving pipeline ``err_no`` / ``err_msg``.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from models.base import ModelError

__all__ = [
    "ServingError",
    "as_serving_error",
    "grpc_code",
    "http_status",
    "pipeline_err_no",
    "unknown_model",
]


class ServingError(Exception):
    """A request that cannot be served; ``kind`` picks the status, ``message`` is for people."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


_GRPC = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "internal": grpc.StatusCode.INTERNAL,
}
_HTTP = {
    "invalid_argument": 400,
    "not_found": 404,
    "resource_exhausted": 413,
    "deadline_exceeded": 504,
    "unavailable": 503,
    "unimplemented": 501,
    "internal": 500,
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


def grpc_code(kind: str) -> grpc.StatusCode:
    return _GRPC.get(kind, grpc.StatusCode.INTERNAL)


def http_status(kind: str) -> int:
    return _HTTP.get(kind, 500)


def pipeline_err_no(kind: str) -> int:
    return _PIPELINE.get(kind, 10000)
