"""Wrapping a gRPC server's method handlers once each, for ``grpc.aio`` server interceptors.

Servers hand back the same handler object per method, so an interceptor that wraps
handlers (closures, a new RpcMethodHandler) can do it once per method and reuse the result
while the server keeps returning that handler. Used by interceptors/grpc_aio.py (metering)
and serving/grpc_guard.py (decoding and admission).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

__all__ = ["HandlerCache"]

Wrap = Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]


class HandlerCache:
    """``cache.wrapped(handler, method)``: ``wrap(handler, method)``, made once per method."""

    def __init__(self, wrap: Wrap) -> None:
        self._wrap = wrap
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrapped(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        result = self._wrap(handler, method)
        self._wrapped[method] = (handler, result)
        return result
