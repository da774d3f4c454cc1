"""grpc.aio server interceptor guarding every gRPC method: undecodable messages and load.

- **Undecodable protobuf.** grpc deserializes a request before any handler runs, and a
  DecodeError there reaches the client as ``UNKNOWN "Unexpected DecodeError"``. Here each
  handler's ``request_deserializer`` is wrapped to return an :class:`_Undecodable` marker
  instead of raising, and the wrapped behavior answers ``INVALID_ARGUMENT`` naming the
  message type ("request is not a valid inference.ModelInferRequest message: ...").
- **Admission.** At most ``max_concurrent`` calls run in the servicers at once; one more is
  answered at once with ``RESOURCE_EXHAUSTED`` (kind ``overloaded``), a message naming
  ``server.max_concurrent_rpcs`` and trailing metadata ``retry-after: 1``, before any of
  its work is queued. Health checks and ServerLive / ServerReady are never refused, so
  probes see a busy server as busy, not dead. grpc's own ``maximum_concurrent_rpcs`` is
  set a little higher by serving/app.py (:func:`grpc_backstop`): a backstop for calls this
  counter does not see (its answer carries no metering).

It goes AFTER the metering interceptor in the server's list, so metering wraps what this
returns: refused calls are metered with the status they got (and the deserializer's bytes
are still measured). One event loop per process, so a plain counter is exact.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from interceptors.handler_cache import HandlerCache
from serving.errors import grpc_code, grpc_trailers

__all__ = ["GrpcGuard", "grpc_backstop"]

# Calls that are never refused for load: probes must keep working while the server is busy.
_EXEMPT_SERVICES = ("grpc.health.",)
_EXEMPT_METHODS = (
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


def grpc_backstop(max_concurrent: int) -> int:
    """grpc's ``maximum_concurrent_rpcs`` for a guard admitting ``max_concurrent``: higher,
    so exempt probes and the guard's own refusals fit under it."""
    return max_concurrent + max(16, max_concurrent // 4)


class _Undecodable:
    """What the wrapped deserializer returns for bytes that are not the expected message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _message_type(deserializer: Callable[[bytes], Any] | None, method: str) -> str:
    """The protobuf type a deserializer (``Message.FromString``) reads, for messages."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return str(name) if name else f"request message of {method}"


class GrpcGuard(grpc.aio.ServerInterceptor):
    """``GrpcGuard(max_concurrent)``: put it after the metering interceptor."""

    def __init__(self, max_concurrent: int) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self._overloaded = (
            f"the server is at its limit of {max_concurrent} concurrent gRPC calls "
            "(server.max_concurrent_rpcs); retry later"
        )
        self._handlers = HandlerCache(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._handlers.wrapped(handler, handler_call_details.method)

    # -- pieces ------------------------------------------------------------------------

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        """Count the call in, or abort it RESOURCE_EXHAUSTED with retry-after."""
        if self.in_flight >= self.max_concurrent:
            await context.abort(
                grpc_code("overloaded"),
                self._overloaded,
                grpc_trailers("overloaded"),
            )
        self.in_flight += 1

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserialize = handler.request_deserializer
        type_name = _message_type(deserialize, method)
        exempt = method in _EXEMPT_METHODS or method.lstrip("/").startswith(_EXEMPT_SERVICES)

        def tolerant_deserializer(data: bytes) -> Any:
            if deserialize is None:
                return data
            try:
                return deserialize(data)
            except Exception as exc:  # DecodeError and whatever a custom one raises
                return _Undecodable(
                    f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                )

        async def reject_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
            if type(request) is _Undecodable:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a valid {type_name} message ({request.reason})",
                )

        if handler.request_streaming:
            # Each streamed message is checked as the servicer reads it.
            def requests(iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                async def checked() -> AsyncIterator[Any]:
                    async for request in iterator:
                        await reject_undecodable(request, context)
                        yield request

                return checked()
        else:

            def requests(request: Any, context: Any) -> Any:
                return request

        admit = self._admit
        guard = self

        if not handler.response_streaming:
            inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
            is_async = inspect.iscoroutinefunction(inner)

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if not handler.request_streaming:
                    await reject_undecodable(request, context)
                if not exempt:
                    await admit(context)
                try:
                    if is_async:
                        return await inner(requests(request, context), context)
                    return await asyncio.to_thread(inner, requests(request, context), context)
                finally:
                    if not exempt:
                        guard.in_flight -= 1

            factory: Any = (
                grpc.stream_unary_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            behavior: Any = unary
        else:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if not handler.request_streaming:
                    await reject_undecodable(request, context)
                if not exempt:
                    await admit(context)
                try:
                    result = inner(requests(request, context), context)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            yield response
                    else:  # writes through context.write()
                        await result
                finally:
                    if not exempt:
                        guard.in_flight -= 1

            factory = (
                grpc.stream_stream_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler
            )
            behavior = stream
        return factory(
            behavior,
            request_deserializer=tolerant_deserializer,
            response_serializer=handler.response_serializer,
        )
