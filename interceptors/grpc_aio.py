"""grpc.aio server interceptor: meters every RPC through the shared metering core.

Shaped like opentelemetry-python-contrib's ``_aio_server.py``: return early when
metering is off, await the continuation, re-wrap the handler with one helper that picks
the wrapper for the handler's shape. Unary-unary calls (every model call) are metered
precisely; streaming calls are metered as a whole (span, status, response bytes; request
bytes are not measured for client streams).

Sizes are the serialized message bytes as they crossed the wire: the request
deserializer is wrapped to note ``len(bytes)``, and the response is serialized once in the
wrapper, with the handler's response serializer replaced by one that reuses those bytes.

gRPC health (``grpc.health.v1``) and reflection calls, and OIP's liveness, readiness and
metadata methods, get spans and metrics with operation ``health`` / ``reflection`` /
``metadata`` and never a ledger record (they stay answerable while the ledger cannot
accept records). Requests whose bytes cannot be deserialized fail inside grpc before the
handler runs and are not metered.

Fail closed (interceptors/billing_policy.py): a call metering refuses at start is aborted
with its kind's code (``invalid_argument`` / ``unavailable``) before the handler runs. A
call refused when it finishes (its record not durable: UNAVAILABLE; a reused request id:
ALREADY_EXISTS) never sends the handler's response: it is aborted with the kind's code,
or, when the frontend set ``usage.error_renderer`` (the pipeline) and the refusal is
about the request, answered OK with the message the renderer built.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from auth.roles import grpc_permission
from auth.throttle import peer_host
from exporters import semconv as sc
from interceptors.billing_policy import rendered_by_frontend
from interceptors.call import MeteredCall
from interceptors.core import MeteringCore
from interceptors.handler_cache import HandlerCache
from serving.errors import ServingError, grpc_code, grpc_trailers

__all__ = ["MeteringServerInterceptor"]

_OPERATION_BY_SERVICE_PREFIX = (
    ("grpc.health.", "health"),
    ("grpc.reflection.", "reflection"),
)
# KServe Open Inference Protocol methods that never carry a model call.
_OIP_SERVICE = "inference.GRPCInferenceService"
_OPERATION_BY_OIP_METHOD = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelConfig": "metadata",
    "ModelStatistics": "metadata",
}


class _Serialized:
    """A response already turned into wire bytes by the wrapper."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _LocalAbort(grpc.aio.AbortError):
    """Raised by the wrapped ``context.abort`` so the wrapper can meter before aborting."""


class _MeteringContext:
    """Wraps the servicer context to capture status and trailing metadata.

    ``abort`` is deferred: the real abort (with our usage trailers merged in) happens
    after the metering core has finished the call. Everything else is forwarded.
    """

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None
        self.trailing: tuple[tuple[str, Any], ...] = ()
        self.aborted = False  # stays True even if the handler swallows our AbortError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        self.code, self.details, self.aborted = code, details, True
        if trailing_metadata:
            self.trailing = tuple(trailing_metadata)
        raise _LocalAbort()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self.details = details
        self._context.set_details(details)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        # Sent once, merged with the usage trailers, when the call is finished.
        self.trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self.trailing


def _carrier(metadata: Any) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str) and key not in carrier:  # -bin values are bytes: skip
            carrier[key.lower()] = value
    return carrier


class MeteringServerInterceptor(grpc.aio.ServerInterceptor):
    """Meters every call of a ``grpc.aio`` server: ``grpc.aio.server(interceptors=[...])``.

    ``server_address`` / ``server_port`` only label spans (``server.address/port``).
    """

    def __init__(
        self,
        core: MeteringCore,
        *,
        server_address: str | None = None,
        server_port: int | None = None,
    ) -> None:
        self._core = core
        self._server_attrs: dict[str, Any] = {}
        if server_address:
            self._server_attrs[sc.SERVER_ADDRESS] = server_address
        if server_port:
            self._server_attrs[sc.SERVER_PORT] = server_port
        # Request sizes noted by the wrapped deserializer, keyed by the message's id,
        # taken by the wrapper that receives that very message (same event loop).
        self._sizes: dict[int, int] = {}
        self._handlers = HandlerCache(self._wrap_handler)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if not self._core.enabled or handler is None:
            return handler
        return self._handlers.wrapped(handler, handler_call_details.method)

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """One metered handler for ``method`` ("/package.Service/Method")."""
        service, _, name = method.lstrip("/").rpartition("/")
        operation = next(
            (op for prefix, op in _OPERATION_BY_SERVICE_PREFIX if service.startswith(prefix)),
            _OPERATION_BY_OIP_METHOD.get(name) if service == _OIP_SERVICE else None,
        )
        attrs = {
            sc.RPC_SYSTEM: sc.RPC_SYSTEM_GRPC,
            sc.RPC_SERVICE: service,
            sc.RPC_METHOD: name,
            **self._server_attrs,
        }
        access = grpc_permission(method)  # once per method (auth/roles.py)

        def start(context: grpc.aio.ServicerContext) -> MeteredCall:
            return self._core.start_call(
                protocol="grpc",
                endpoint=method,
                span_name=method.lstrip("/"),
                carrier=_carrier(context.invocation_metadata()),
                attributes=attrs,
                operation=operation,
                access=access,
                peer=peer_host(context.peer()) if self._core.auth is not None else None,
            )

        serialize = handler.response_serializer or _identity
        deserialize = handler.request_deserializer or _identity
        sizes = self._sizes

        def measuring_deserializer(data: bytes) -> Any:
            message = deserialize(data)
            sizes[id(message)] = len(data)
            return message

        def reusing_serializer(response: Any) -> bytes:
            return response.data if type(response) is _Serialized else serialize(response)

        streaming = handler.request_streaming or handler.response_streaming
        if not streaming:
            behavior = self._unary(handler.unary_unary, start, attrs, serialize)
            factory: Any = grpc.unary_unary_rpc_method_handler
        elif handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
            behavior = self._response_stream(inner, start, attrs, serialize)
            factory = (
                grpc.stream_stream_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler
            )
        else:
            behavior = self._unary(handler.stream_unary, start, attrs, serialize)
            factory = grpc.stream_unary_rpc_method_handler
        return factory(
            behavior,
            # Client streams would leave unread sizes behind: not measured (documented).
            request_deserializer=(
                handler.request_deserializer
                if handler.request_streaming
                else measuring_deserializer
            ),
            response_serializer=reusing_serializer,
        )

    async def _finish(
        self,
        call: MeteredCall,
        context: grpc.aio.ServicerContext,
        ctx: _MeteringContext,
        attrs: dict[str, Any],
        code: grpc.StatusCode,
        details: str | None,
        request_bytes: int,
        response_bytes: int,
    ) -> tuple[ServingError | None, tuple[tuple[str, Any], ...]]:
        """Finish the call and set trailers; the refusal when metering refused it."""
        refusal = None
        try:
            await call.finish(
                ok=code == grpc.StatusCode.OK,
                status=code.name,
                error_message=details,
                request_bytes=request_bytes,
                response_bytes=response_bytes,
                transport_attributes=(
                    attrs
                    if sc.RPC_GRPC_STATUS_CODE in attrs
                    else {**attrs, sc.RPC_GRPC_STATUS_CODE: code.value[0]}
                ),
            )
        except ServingError as exc:
            refusal = exc
        trailers = ctx.trailing + tuple(call.response_metadata())
        if trailers:  # nothing to send for most non-model calls: skip grpc's metadata work
            context.set_trailing_metadata(trailers)
        return refusal, trailers

    async def _refuse(
        self,
        call: MeteredCall,
        context: grpc.aio.ServicerContext,
        refusal: ServingError,
        trailers: Any,
        serialize: Callable[[Any], bytes],
    ) -> _Serialized:
        """Answer a call refused after its handler ran; the handler's response never leaves.

        The frontend's rendering of the refusal (sent with status OK), else an abort with
        the kind's code. Raises grpc's AbortError for the latter.
        """
        try:
            rendered = rendered_by_frontend(call.usage, refusal)
            if rendered is not None:
                return _Serialized(serialize(rendered))
        except Exception as exc:  # a broken renderer: the kind's own status still refuses
            self._core.count_error("error_renderer", exc, call.request_id)
        await _abort(context, refusal, trailers)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    async def _cancelled(
        self,
        call: MeteredCall,
        ctx: _MeteringContext,
        attrs: dict[str, Any],
        request_bytes: int,
    ) -> None:
        """The client went away (or the deadline passed): record it, send nothing."""
        code = grpc.StatusCode.CANCELLED
        # Nothing was served, so a refused record leaves nothing unbilled.
        with contextlib.suppress(ServingError):
            await call.finish(
                ok=False,
                status=code.name,
                error_message="cancelled",
                request_bytes=request_bytes,
                transport_attributes={**attrs, sc.RPC_GRPC_STATUS_CODE: code.value[0]},
            )

    def _unary(
        self,
        behavior: Callable[..., Any],
        start: Callable[[grpc.aio.ServicerContext], MeteredCall],
        attrs: dict[str, Any],
        serialize: Callable[[Any], bytes],
    ) -> Callable[..., Awaitable[Any]]:
        sizes = self._sizes
        is_async = inspect.iscoroutinefunction(behavior)  # once per method, not per call
        # Transport attributes per status code, built once each.
        by_code: dict[grpc.StatusCode, dict[str, Any]] = {}

        async def metered_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_bytes = sizes.pop(id(request), 0)
            try:
                call = start(context)
            except Exception as exc:  # fail closed: what cannot be metered is not served
                refusal = self._core.start_refusal(exc)
                await _abort(context, refusal, ())
            ctx = _MeteringContext(context)
            response, payload, error, aborted = None, None, None, False
            try:
                with call.activate():
                    if is_async:
                        response = await behavior(request, ctx)
                    else:  # a sync handler: keep it off the event loop
                        response = await asyncio.to_thread(behavior, request, ctx)
                code, aborted = ctx.code or grpc.StatusCode.OK, ctx.aborted
                if code == grpc.StatusCode.OK and response is not None:
                    payload = serialize(response)
            except asyncio.CancelledError:
                await self._cancelled(call, ctx, attrs, request_bytes)
                raise
            except _LocalAbort:
                code, aborted = ctx.code or grpc.StatusCode.UNKNOWN, True
            except Exception as exc:  # the handler failed: grpc answers UNKNOWN
                code, error = grpc.StatusCode.UNKNOWN, exc
                ctx.details = f"Unexpected {type(exc).__name__}"
                call.span.record_exception(exc)
            final_attrs = by_code.get(code)
            if final_attrs is None:
                final_attrs = by_code[code] = {**attrs, sc.RPC_GRPC_STATUS_CODE: code.value[0]}
            refusal, trailers = await self._finish(
                call,
                context,
                ctx,
                final_attrs,
                code,
                ctx.details,
                request_bytes,
                len(payload) if payload is not None else 0,
            )
            if refusal is not None:
                return await self._refuse(call, context, refusal, trailers, serialize)
            await _conclude(context, trailers, error, aborted, code, ctx.details)
            return _Serialized(payload) if payload is not None else response

        return metered_unary

    def _response_stream(
        self,
        behavior: Callable[..., Any],
        start: Callable[[grpc.aio.ServicerContext], MeteredCall],
        attrs: dict[str, Any],
        serialize: Callable[[Any], bytes],
    ) -> Callable[..., AsyncIterator[Any]]:
        sizes = self._sizes

        async def metered_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_bytes = sizes.pop(id(request), 0)
            try:
                call = start(context)
            except Exception as exc:  # fail closed: what cannot be metered is not served
                refusal = self._core.start_refusal(exc)
                await _abort(context, refusal, ())
            ctx = _MeteringContext(context)
            response_bytes, error, aborted = 0, None, False
            try:
                with call.activate():
                    if inspect.isasyncgenfunction(behavior):
                        async for response in behavior(request, ctx):
                            data = serialize(response)
                            response_bytes += len(data)
                            yield _Serialized(data)
                    else:  # writes through context.write(): bytes not counted
                        await behavior(request, ctx)
                code, aborted = ctx.code or grpc.StatusCode.OK, ctx.aborted
            except asyncio.CancelledError:
                await self._cancelled(call, ctx, attrs, request_bytes)
                raise
            except _LocalAbort:
                code, aborted = ctx.code or grpc.StatusCode.UNKNOWN, True
            except Exception as exc:
                code, error = grpc.StatusCode.UNKNOWN, exc
                ctx.details = f"Unexpected {type(exc).__name__}"
                call.span.record_exception(exc)
            refusal, trailers = await self._finish(
                call, context, ctx, attrs, code, ctx.details, request_bytes, response_bytes
            )
            if refusal is not None:  # streamed items already left: only the status can refuse
                await _abort(context, refusal, trailers)
            await _conclude(context, trailers, error, aborted, code, ctx.details)

        return metered_stream


async def _abort(
    context: grpc.aio.ServicerContext, refusal: ServingError, trailers: Any
) -> None:
    """Refuse with the kind's code; ``retry-after`` where HTTP would send Retry-After."""
    extra = grpc_trailers(refusal)
    await context.abort(
        grpc_code(refusal.kind), refusal.message, (*trailers, *extra) if extra else trailers
    )


async def _conclude(
    context: grpc.aio.ServicerContext,
    trailers: Any,
    error: BaseException | None,
    aborted: bool,
    code: grpc.StatusCode,
    details: str | None,
) -> None:
    """After metering finished (not refused): re-raise, or re-abort as the handler did."""
    if error is not None:
        raise error
    if aborted:
        await context.abort(code, details or "", trailers)


def _identity(data: Any) -> Any:
    return data
