"""Pure ASGI middleware: meters every HTTP request through the shared metering core.

No BaseHTTPMiddleware (it breaks ContextVar propagation, which request usage relies on).
Per request: a small responder object wraps ``send`` and ``receive``; it counts request
body bytes, and buffers ``http.response.start`` and the body until the final body
message, so the usage headers can be added and the ledger written before anything
leaves. Responses are therefore not streamed through this middleware (model calls answer
one JSON document; non-model endpoints such as ``/metrics`` are skipped).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from exporters import semconv as sc
from exporters.ledger.base import LedgerWriteError
from interceptors.billing_policy import LEDGER_FAILURE_MESSAGE
from interceptors.call import MeteredCall
from interceptors.core import MeteringCore

__all__ = ["MeteringMiddleware", "default_skip"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_USAGE_HEADERS = frozenset(
    {sc.HEADER_REQUEST_ID, sc.HEADER_USAGE_INPUT_TOKENS, sc.HEADER_USAGE_OUTPUT_TOKENS}
)


def default_skip(path: str) -> bool:
    """Endpoints that are not model calls: no span, no record (``/metrics``, health)."""
    return path == "/metrics" or path.startswith("/v2/health") or path == "/favicon.ico"


class _Responder:
    """Per-request state: counts bytes in, holds the response until it is complete."""

    __slots__ = ("receive", "send", "start", "body", "complete", "request_bytes")

    def __init__(self, receive: Receive, send: Send) -> None:
        self.receive = receive
        self.send = send
        self.start: Message | None = None
        self.body: list[bytes] = []
        self.complete = False
        self.request_bytes = 0

    async def counting_receive(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.request_bytes += len(message.get("body", b""))
        return message

    async def holding_send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
        elif kind == "http.response.body":
            self.body.append(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:  # e.g. trailers: nothing of ours to add
            await self.send(message)


class MeteringMiddleware:
    """``MeteringMiddleware(app, core)``: wrap the ASGI app (outermost is best).

    ``skip(path)`` says which paths are passed through unmetered (default:
    :func:`default_skip`). Non-HTTP scopes (lifespan, websocket) always pass through.
    """

    def __init__(
        self, app: ASGIApp, core: MeteringCore, *, skip: Callable[[str], bool] = default_skip
    ) -> None:
        self.app = app
        self.core = core
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.core.enabled or self.skip(scope["path"]):
            await self.app(scope, receive, send)
            return
        carrier: dict[str, str] = {}
        for raw_key, raw_value in scope.get("headers") or ():
            key = raw_key.decode("latin-1").lower()
            if key not in carrier:
                carrier[key] = raw_value.decode("latin-1")
        method, path = scope["method"], scope["path"]
        attrs: dict[str, Any] = {
            sc.HTTP_REQUEST_METHOD: method,
            sc.URL_PATH: path,
            sc.URL_SCHEME: scope.get("scheme", "http"),
        }
        server = scope.get("server")
        if server and server[0]:
            attrs[sc.SERVER_ADDRESS] = server[0]
            if server[1] is not None:
                attrs[sc.SERVER_PORT] = server[1]
        try:
            call = self.core.start_call(
                protocol="http",
                endpoint=path,
                span_name=f"{method} {path}",
                carrier=carrier,
                attributes=attrs,
            )
        except Exception as exc:  # metering must not fail the request: serve unmetered
            self.core.count_error("start", exc)
            await self.app(scope, receive, send)
            return
        responder = _Responder(receive, send)
        error: BaseException | None = None
        try:
            with call.activate():
                await self.app(scope, responder.counting_receive, responder.holding_send)
        except Exception as exc:  # answered 500 below, then re-raised for the server's log
            error = exc
            call.span.record_exception(exc)
        await self._finish(scope, call, responder, attrs, carrier, error)
        if error is not None:
            raise error

    async def _finish(
        self,
        scope: Scope,
        call: MeteredCall,
        responder: _Responder,
        attrs: dict[str, Any],
        carrier: dict[str, str],
        error: BaseException | None,
    ) -> None:
        route = getattr(scope.get("route"), "path", None)
        if route:
            # The route template is known only once the router ran: low-cardinality name.
            attrs[sc.HTTP_ROUTE] = route
            call.endpoint = route
            call.span.update_name(f"{scope['method']} {route}")
        start = responder.start if responder.complete and error is None else None
        status = int(start["status"]) if start is not None else 500
        attrs[sc.HTTP_RESPONSE_STATUS_CODE] = status
        body = b"".join(responder.body) if start is not None else b""
        request_bytes = responder.request_bytes
        declared = carrier.get("content-length", "")
        if declared.isdigit():  # the app may not have read a body it rejected
            request_bytes = max(request_bytes, int(declared))
        message = None
        if error is not None:
            message = f"unhandled {type(error).__name__}"
        elif start is None:
            message = "application sent no complete response"
        try:
            await call.finish(
                ok=status < 400,
                status=str(status),
                error_message=message,
                request_bytes=request_bytes,
                response_bytes=len(body),
                transport_attributes=attrs,
            )
        except LedgerWriteError:
            body = json.dumps({"error": LEDGER_FAILURE_MESSAGE}).encode()
            await self._send(responder.send, call, None, 503, body, b"application/json")
            return
        if start is None:
            body = json.dumps({"error": "internal server error"}).encode()
            await self._send(responder.send, call, None, 500, body, b"application/json")
            return
        await self._send(responder.send, call, start, status, body, None)

    @staticmethod
    async def _send(
        send: Send,
        call: MeteredCall,
        start: Message | None,
        status: int,
        body: bytes,
        content_type: bytes | None,
    ) -> None:
        headers = [
            (k, v)
            for k, v in (start.get("headers") or () if start is not None else ())
            if k.decode("latin-1").lower() not in _USAGE_HEADERS
        ]
        if content_type is not None:
            headers = [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ]
        headers += [(k.encode(), v.encode()) for k, v in call.response_metadata()]
        response_start = dict(start) if start is not None else {"type": "http.response.start"}
        response_start["status"] = status
        response_start["headers"] = headers
        await send(response_start)
        await send({"type": "http.response.body", "body": body})
