"""The HTTP frontend: OIP v2 REST, the Paddle Serving pipeline over HTTP, PaddleX's ``/ocr``
(serving/paddlex_ocr.py), and the small APIs.

OIP REST follows KServe v2 including Triton's binary tensor data extension (a JSON header of
``Inference-Header-Content-Length`` bytes followed by raw tensors), which the real
``tritonclient.http`` uses by default. Errors are OIP's ``{"error": "..."}`` with 400 / 404 /
409 / 413 / 503 (with ``Retry-After``) / 504. The pipeline form is ``POST /{name}/{method}``
with the pipeline messages as JSON. Every JSON body is parsed by serving/json_body.py
(nesting limit ``server.max_json_depth``); a 500 that still happens is logged with its
traceback and the request id.

Two pure ASGI guards go around the app: :class:`ConcurrencyLimit` (at most
``server.max_concurrent_http`` requests in the app, the excess answered 503 at once) and
:class:`BodyLimit` (413 for a body over ``server.max_message_bytes``, declared or chunked).
Metering wraps them from outside (interceptors/asgi.py), so refused calls are metered too;
nothing here knows about it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from interceptors.asgi import default_skip
from interceptors.model_statistics import PROCESS_STATISTICS, ModelStatistics
from models.usage import current_usage
from serving import oip
from serving.dispatch import tokenize
from serving.errors import (
    ServingError,
    as_serving_error,
    http_headers,
    http_status,
    log_internal,
    pipeline_err_no,
)
from serving.json_body import parse_json
from serving.model_host import ModelHost
from serving.paddlex_ocr import OCR_ENDPOINT, answer_ocr
from serving.pipeline import PipelineReply, answer_pipeline, error_reply
from serving.version import SERVER_NAME, SERVER_VERSION

__all__ = ["BodyLimit", "ConcurrencyLimit", "build_http_app"]

_HEADER_LENGTH = "inference-header-content-length"
DEFAULT_MAX_JSON_DEPTH = 64


def _error(exc: BaseException, request: Request | None = None) -> JSONResponse:
    """The OIP error answer for ``exc``; an internal one is logged with its traceback."""
    if isinstance(exc, ClientDisconnect):  # nobody is left to answer; not a server fault
        exc = ServingError("invalid_argument", "the client disconnected before sending its body")
    error = as_serving_error(exc)
    if error.kind == "internal":
        caller_id = request.headers.get("x-request-id") if request is not None else None
        log_internal(exc, caller_id, surface="http", path=request.url.path if request else None)
    return JSONResponse(
        {"error": error.message},
        status_code=http_status(error.kind),
        headers=http_headers(error),
    )


def _parse_oip_body(
    body: bytes, header_length: str | None, max_depth: int
) -> tuple[dict[str, Any], bytes]:
    if not body:
        raise ServingError(
            "invalid_argument", "empty request body: send an OIP v2 inference request"
        )
    json_part, binary = body, b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise ServingError(
                "invalid_argument", "Inference-Header-Content-Length is not an integer"
            ) from None
        if not 0 < size <= len(body):
            raise ServingError(
                "invalid_argument", "Inference-Header-Content-Length is outside the body"
            )
        json_part, binary = body[:size], body[size:]
    document = parse_json(json_part, max_depth=max_depth)
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise ServingError("invalid_argument", "request JSON needs an 'inputs' list")
    return document, binary


def _read_inputs(document: dict[str, Any], binary: bytes) -> Iterator[oip.Tensor]:
    """The request's inputs, JSON data or binary-data chunks; a generator, so it checks when
    iterated (after the model is looked up)."""
    offset = 0
    for tensor in document["inputs"]:
        if not isinstance(tensor, dict) or not {"name", "datatype", "shape"} <= set(tensor):
            raise ServingError(
                "invalid_argument", "each input needs 'name', 'datatype' and 'shape'"
            )
        name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise ServingError("invalid_argument", "an input's 'name' and 'datatype' are strings")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise ServingError(
                "invalid_argument", f"input {name!r}: 'shape' must be a list of integers"
            )
        size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if not _is_int(size) or size < 0:
                raise ServingError(
                    "invalid_argument",
                    f"input {name!r}: 'binary_data_size' must be an integer >= 0",
                )
            if offset + int(size) > len(binary):
                raise ServingError(
                    "invalid_argument", f"input {name!r}: binary data shorter than declared"
                )
            chunk = binary[offset : offset + int(size)]
            offset += int(size)
            yield oip.Tensor(name, datatype, shape, raw=chunk)
        elif "data" in tensor:
            yield oip.Tensor(name, datatype, shape, data=tensor["data"])
        else:
            raise ServingError(
                "invalid_argument", f"input {name!r} has neither 'data' nor binary data"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parameters(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """``entry["parameters"]`` (absent or null: none); ServingError if it is no object."""
    params = entry.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ServingError("invalid_argument", f"{where}: 'parameters' must be a JSON object")
    return params


def _requested_outputs(document: dict[str, Any]) -> list[oip.RequestedOutput]:
    outputs = document.get("outputs") or []
    if not isinstance(outputs, list):
        raise ServingError("invalid_argument", "'outputs' must be a list")
    requested = []
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise ServingError("invalid_argument", "each requested output needs a 'name' string")
        params = _parameters(output, f"output {output['name']!r}")
        binary = bool(params["binary_data"]) if "binary_data" in params else None
        requested.append(oip.RequestedOutput(output["name"], binary))
    return requested


def _oip_response(result: oip.InferResult, request_id: Any) -> Response:
    outputs, chunks = [], []
    for output in result.outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
        }
        if output.raw is not None:
            entry["parameters"] = {"binary_data_size": len(output.raw)}
            chunks.append(output.raw)
        else:
            entry["data"] = output.data
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "outputs": outputs,
    }
    if request_id:
        body["id"] = request_id
    header = json.dumps(body, ensure_ascii=False).encode("utf-8")
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def _oip_router(
    host: ModelHost, ready: Callable[[], bool], max_depth: int, statistics: ModelStatistics
) -> APIRouter:
    router = APIRouter()

    @router.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready")
    async def server_ready() -> Response:
        ok = ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @router.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return oip.server_metadata()

    # Before /v2/models/{name}: "stats" is this route, not a model name (as in Triton).
    @router.get("/v2/models/stats")
    @router.get("/v2/models/{name}/stats")
    @router.get("/v2/models/{name}/versions/{version}/stats")
    async def model_statistics(
        request: Request, name: str | None = None, version: str | None = None
    ) -> Response:
        try:
            return JSONResponse(oip.model_statistics(host, name, version, statistics))
        except Exception as exc:
            return _error(exc, request)

    @router.get("/v2/models/{name}")
    @router.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, request: Request, version: str | None = None) -> Response:
        try:
            return JSONResponse(oip.model_metadata(host, name, version))
        except Exception as exc:
            return _error(exc, request)

    @router.get("/v2/models/{name}/config")
    @router.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, request: Request, version: str | None = None) -> Response:
        try:
            return JSONResponse(oip.model_config(host, name, version))
        except Exception as exc:
            return _error(exc, request)

    @router.get("/v2/models/{name}/ready")
    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, request: Request, version: str | None = None) -> Response:
        try:
            answer = oip.model_ready(host, name, version)
        except Exception as exc:
            return _error(exc, request)
        return JSONResponse(answer, status_code=200 if answer["ready"] else 503)

    @router.post("/v2/models/{name}/infer")
    @router.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        try:
            document, binary = _parse_oip_body(
                await request.body(), request.headers.get(_HEADER_LENGTH), max_depth
            )
            request_id = document.get("id")
            if request_id is not None and not (isinstance(request_id, str) or _is_int(request_id)):
                raise ServingError("invalid_argument", "the request's 'id' must be a string")
            params = _parameters(document, "request")
            result = await oip.infer(
                host,
                name,
                _read_inputs(document, binary),
                outputs=_requested_outputs(document),
                binary_default=bool(params.get("binary_data_output", False)),
                request_id=str(request_id) if request_id else None,
                version=version,
            )
            return _oip_response(result, request_id)
        except Exception as exc:
            return _error(exc, request)

    oip_routes = list(router.routes)

    # Last: anything else under /v2 is answered the OIP way, {"error": ...}, never by the
    # pipeline's /{name}/{method} nor with FastAPI's {"detail": ...}.
    @router.api_route("/v2/{rest:path}", methods=_ALL_METHODS, include_in_schema=False)
    async def unknown_oip_route(rest: str, request: Request) -> Response:
        return _unknown_route(request, oip_routes)

    @router.api_route("/v2", methods=_ALL_METHODS, include_in_schema=False)
    async def unknown_oip_method(request: Request) -> Response:
        return _unknown_route(request, oip_routes)

    return router


_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Triton's REST extensions paddle-meter does not offer: 501, as gRPC answers UNIMPLEMENTED.
_TRITON_UNOFFERED = re.compile(
    r"/v2/(repository|systemsharedmemory|cudasharedmemory|trace|logging)(/.*)?"
    r"|/v2/models/[^/]+(/versions/[^/]+)?/(trace/setting|generate|generate_stream)"
)


def _unknown_route(request: Request, routes: list[Any]) -> Response:
    """404 for a path under /v2 that no OIP route has; 405 (with ``Allow``) for one that
    exists with other methods. Both ``{"error": ...}``."""
    allowed: set[str] = set()
    for route in routes:
        match, _ = route.matches(request.scope)
        if match is Match.PARTIAL:  # the path is there, for other methods
            allowed |= set(route.methods or ())
    method, path = request.method, request.url.path
    if _TRITON_UNOFFERED.fullmatch(path):
        return JSONResponse(
            {"error": f"{path} (a Triton extension) is not offered by paddle-meter"},
            status_code=http_status("unimplemented"),
        )
    if allowed:
        return JSONResponse(
            {
                "error": f"method {method} is not allowed on {path}; use {', '.join(sorted(allowed))}"
            },
            status_code=405,
            headers={"Allow": ", ".join(sorted(allowed))},
        )
    return JSONResponse({"error": f"no OIP v2 endpoint at {method} {path}"}, status_code=404)


def _is_oip_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


async def _oip_http_exception(request: Request, exc: Exception) -> Response:
    """FastAPI's own errors (a route's 404 / 405 / 422) on an OIP path: ``{"error": ...}``."""
    if not _is_oip_path(request.url.path):
        if isinstance(exc, RequestValidationError):
            return await request_validation_exception_handler(request, exc)
        return await http_exception_handler(request, exc)
    if isinstance(exc, RequestValidationError):
        return JSONResponse({"error": f"invalid request: {exc.errors()}"}, status_code=422)
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
    )


async def _json_object(request: Request, shape: str, max_depth: int) -> dict[str, Any]:
    """The request body as a JSON object; ServingError naming the expected ``shape``."""
    try:
        document = parse_json(await request.body() or b"null", max_depth=max_depth)
    except ServingError as exc:
        raise ServingError(exc.kind, f"{exc.message}; send {shape}") from None
    if not isinstance(document, dict):
        raise ServingError("invalid_argument", f"request body must be a JSON object like {shape}")
    return document


def _tokenize_router(host: ModelHost, max_depth: int) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/tokenize")
    async def count_tokens(request: Request) -> Response:
        """{"model": "ernie", "text": "...", "text_pair": null} -> ids and the billed count."""
        try:
            shape = '{"model": "<name>", "text": "..."}'
            document = await _json_object(request, shape, max_depth)
            name = document.get("model") or host.default_name() or ""
            if "text" not in document or not isinstance(name, str):
                raise ServingError("invalid_argument", f"send {shape}")
            return JSONResponse(
                await tokenize(host, name, document["text"], document.get("text_pair"))
            )
        except Exception as exc:
            return _error(exc, request)

    return router


def _paddlex_ocr_router(
    host: ModelHost, max_depth: int, url_hosts: frozenset[str], max_fetch_bytes: int
) -> APIRouter:
    """PaddleX 3.x basic serving's ``POST /ocr`` (the protocol: serving/paddlex_ocr.py)."""
    router = APIRouter()

    @router.post(OCR_ENDPOINT)
    async def paddlex_ocr(request: Request) -> Response:
        caller_id = request.headers.get("x-request-id")
        try:
            body = await request.body()
        except ClientDisconnect:
            body = b""
        reply = await answer_ocr(
            host,
            body,
            header_request_id=caller_id,
            max_depth=max_depth,
            url_hosts=url_hosts,
            max_fetch_bytes=max_fetch_bytes,
        )
        return Response(
            reply.encoded(),
            status_code=reply.status,
            media_type="application/json",
            headers=reply.headers,
        )

    return router


def _pipeline_json(reply: PipelineReply) -> bytes:
    """A pipeline reply as Paddle Serving's HTTP gateway frames it."""
    document = {"err_no": reply.err_no, "err_msg": reply.err_msg, "key": reply.keys}
    document["value"] = reply.values
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def _render_pipeline_error(kind: str, message: str) -> tuple[int, bytes]:
    """``usage.error_renderer`` of the pipeline over HTTP: status 200, err_no in the body."""
    return 200, _pipeline_json(error_reply(kind, message))


def _pipeline_router(host: ModelHost, max_depth: int) -> APIRouter:
    router = APIRouter()

    @router.post("/{name}/{method}")
    async def pipeline(name: str, method: str, request: Request) -> Response:
        if (usage := current_usage()) is not None:
            usage.error_renderer = _render_pipeline_error
        caller_id = request.headers.get("x-request-id")
        # An unreadable body is an HTTP error, as Paddle Serving's gateway makes it; a
        # readable one with bad fields is answered the pipeline way, with err_no.
        try:
            document = await _json_object(request, '{"key": [...], "value": [...]}', max_depth)
            logid = document.get("logid") or 0
            if isinstance(logid, str) and logid.isascii() and logid.isdigit():
                logid = int(logid)  # some clients send it as a string
            if not _is_int(logid) or not 0 <= logid < 2**64:
                raise ServingError("invalid_argument", "bad logid: send an integer >= 0")
        except Exception as exc:
            if isinstance(exc, ClientDisconnect):
                exc = ServingError("invalid_argument", "the client disconnected")
            error = as_serving_error(exc)
            if error.kind == "internal":
                log_internal(exc, caller_id, surface="pipeline-http", path=request.url.path)
            return JSONResponse(
                {"err_no": pipeline_err_no(error.kind), "err_msg": error.message},
                status_code=http_status(error.kind),
                headers=http_headers(error),
            )
        reply = await answer_pipeline(
            host,
            name,
            method,
            document.get("key") or [],
            document.get("value") or [],
            (),
            logid,
            caller_request_id=caller_id,
        )
        return Response(_pipeline_json(reply), media_type="application/json")

    @router.get("/{name}/{method}")
    async def pipeline_get(name: str, method: str) -> Response:
        return JSONResponse(
            {"error": 'use POST with a JSON body {"key": [...], "value": [...]}'},
            status_code=405,
            headers={"Allow": "POST"},
        )

    return router


async def _send_error(
    send: Callable, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    """Answer an OIP-style ``{"error": message}`` straight on ASGI (for the guards)."""
    body = json.dumps({"error": message}).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(ServingError):
    """Raised from ``receive`` once a body passed the limit; a route that catches it
    answers 413 too, but BodyLimit has answered already and drops whatever follows."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            "resource_exhausted",
            f"request body is larger than the server's limit of {max_bytes} bytes "
            "(server.max_message_bytes)",
        )


class BodyLimit:
    """Pure ASGI guard: answer 413 before reading more than ``max_bytes`` of a request body.

    A declared Content-Length over the limit is refused before the app runs. A chunked
    body (no Content-Length) is counted as it arrives: at the chunk that passes the limit
    the 413 is sent at once, ``receive`` raises :class:`_TooLarge` into the app, and every
    later message the app (or Starlette's error middleware) sends is dropped, so the client
    sees exactly one response, the 413.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, 413, _TooLarge(self.max_bytes).message)
            return
        seen = 0
        started = rejected = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if not started and not rejected:
                        rejected = True
                        await _send_error(send, 413, _TooLarge(self.max_bytes).message)
                    raise _TooLarge(self.max_bytes)
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if rejected:
                return  # the 413 is the answer
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not rejected:  # raised after the app had started its own answer
                raise


class ConcurrencyLimit:
    """Pure ASGI guard: at most ``max_in_flight`` HTTP requests inside the app at once.

    The excess is answered at once with 503, ``Retry-After`` and a message naming
    ``server.max_concurrent_http``: nothing of it is read or queued, so memory stays
    bounded under any load. Health and metrics paths (interceptors.asgi.default_skip) are
    never refused, so probes still see the server while it is busy. One event loop per
    process, so a plain counter is exact.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._message = (
            f"the server is at its limit of {max_in_flight} concurrent HTTP requests "
            "(server.max_concurrent_http); retry later"
        )

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or default_skip(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            await _send_error(
                send, http_status("overloaded"), self._message, http_headers("overloaded")
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def build_http_app(
    host: ModelHost,
    *,
    extra_routers: list[APIRouter] = (),
    ready: Callable[[], bool] | None = None,
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
    statistics: ModelStatistics = PROCESS_STATISTICS,
    ocr_url_hosts: frozenset[str] = frozenset(),
    max_fetch_bytes: int = 32 * 1024 * 1024,
) -> FastAPI:
    """The FastAPI app; ``extra_routers`` (metrics, usage, tokenize) go before the pipeline's
    catch-all ``/{name}/{method}`` so it cannot shadow them. ``ready`` answers
    ``/v2/health/ready`` (default: every model is ready); ``statistics`` is what the
    statistics extension reports (default: this process's, fed by the metering core).
    ``ocr_url_hosts``: hosts ``/ocr`` may fetch a ``file`` URL from (none: URLs refused),
    reading at most ``max_fetch_bytes``.
    Every error under ``/v2`` is OIP's ``{"error": ...}``."""
    app = FastAPI(title=SERVER_NAME, version=SERVER_VERSION, docs_url="/docs", redoc_url=None)
    app.add_exception_handler(StarletteHTTPException, _oip_http_exception)
    app.add_exception_handler(RequestValidationError, _oip_http_exception)
    app.include_router(_oip_router(host, ready or host.all_ready, max_json_depth, statistics))
    app.include_router(_tokenize_router(host, max_json_depth))
    for router in extra_routers:
        app.include_router(router)
    app.include_router(
        _paddlex_ocr_router(host, max_json_depth, ocr_url_hosts, max_fetch_bytes)
    )
    app.include_router(_pipeline_router(host, max_json_depth))
    return app
