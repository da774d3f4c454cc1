"""Pure ASGI middleware: meters every HTTP request through the shared metering core.

No BaseHTTPMiddleware (it breaks ContextVar propagation, which request usage relies on).
Per request: a small responder object wraps ``send`` and ``receive``; it counts request
body bytes, and buffers ``http.response.start`` and the body until the final body
message, so the usage headers can be added and the ledger written before anything
leaves. Responses are therefore not streamed through this middleware (model calls answer
one JSON document; non-model endpoints such as ``/metrics`` are skipped).

Fail closed (interceptors/billing_policy.py): a request metering refuses at start is
answered with its kind's status and ``{"error": message}`` before the app runs (its body
is never read). A request refused when it finishes (record not durable: 503; a reused
request id: 409) never sends the app's held response: the refusal replaces it, or, when
the frontend set ``usage.error_renderer`` (the pipeline) and the refusal is about the
request, the ``(status, body)`` the renderer built.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from auth.roles import Permission, http_permission
from exporters import semconv as sc
from interceptors.billing_policy import rendered_by_frontend
from interceptors.call import MeteredCall
from interceptors.core import MeteringCore
from serving.errors import ServingError, http_headers, http_status

__all__ = ["MeteringMiddleware", "default_skip"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_USAGE_HEADERS = frozenset(
    {
        sc.HEADER_REQUEST_ID,
        sc.HEADER_USAGE_INPUT_TOKENS,
        sc.HEADER_USAGE_OUTPUT_TOKENS,
        sc.HEADER_USAGE_REPLAY,
    }
)
_JSON = b"application/json"
# Reads (metadata, readiness, /v1/usage): never model calls, so they stay answerable while
# the ledger cannot accept records.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_REMEMBERED_ROUTES = 1024


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _extra_headers(refusal: ServingError) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in http_headers(refusal).items()]


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
        self._access_by_route: dict[tuple[str, str], tuple[Permission, bool]] = {}

    def _access(self, method: str, path: str) -> tuple[Permission, bool]:
        """The endpoint's (permission, key may come in the body), remembered per path
        (bounded: paths are caller-chosen)."""
        key = (method, path)
        access = self._access_by_route.get(key)
        if access is None:
            access = http_permission(method, path)
            if len(self._access_by_route) < _MAX_REMEMBERED_ROUTES:
                self._access_by_route[key] = access
        return access

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
        client = scope.get("client")
        try:
            call = self.core.start_call(
                protocol="http",
                endpoint=path,
                span_name=f"{method} {path}",
                carrier=carrier,
                attributes=attrs,
                may_bill=method not in _SAFE_METHODS,
                access=self._access(method, path),
                peer=client[0] if client else None,
            )
        except Exception as exc:  # fail closed: what cannot be metered is not served
            refusal = self.core.start_refusal(exc)
            body = _error_body(refusal.message)
            headers = [
                (b"content-type", _JSON),
                (b"content-length", str(len(body)).encode()),
                *_extra_headers(refusal),
            ]
            status = http_status(refusal.kind)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
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
        except ServingError as refusal:  # the held response never leaves
            await self._refuse(responder.send, call, refusal)
            return
        if start is None:
            body = _error_body("internal server error")
            await self._send(responder.send, call, None, 500, body, _JSON)
            return
        await self._send(responder.send, call, start, status, body, None)

    async def _refuse(self, send: Send, call: MeteredCall, refusal: ServingError) -> None:
        """Answer a request refused after the app ran: the frontend's rendering of the
        refusal, else the kind's status with ``{"error": message}``."""
        try:
            rendered = rendered_by_frontend(call.usage, refusal)
            if rendered is not None:
                status, body = rendered
                await self._send(send, call, None, int(status), bytes(body), _JSON)
                return
        except Exception as exc:  # a broken renderer: the kind's own status still refuses
            self.core.count_error("error_renderer", exc, call.request_id)
        await self._send(
            send,
            call,
            None,
            http_status(refusal.kind),
            _error_body(refusal.message),
            _JSON,
            _extra_headers(refusal),
        )

    @staticmethod
    async def _send(
        send: Send,
        call: MeteredCall,
        start: Message | None,
        status: int,
        body: bytes,
        content_type: bytes | None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
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
                *(extra_headers or ()),
            ]
        headers += [(k.encode(), v.encode()) for k, v in call.response_metadata()]
        response_start = dict(start) if start is not None else {"type": "http.response.start"}
        response_start["status"] = status
        response_start["headers"] = headers
        await send(response_start)
        await send({"type": "http.response.body", "body": body})
