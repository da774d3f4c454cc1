"""The HTTP frontend: OIP v2 REST, the Paddle Serving pipeline over HTTP, and the small APIs.

OIP REST follows KServe v2 including Triton's binary tensor data extension (a JSON header of
``Inference-Header-Content-Length`` bytes followed by raw tensors), which the real
``tritonclient.http`` uses by default. Errors are OIP's ``{"error": "..."}`` with 400 / 404 /
413 / 504. The pipeline form is ``POST /{name}/{method}`` with the pipeline messages as JSON.
Metering wraps this app from outside (interceptors/asgi.py); nothing here knows about it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serving import oip
from serving.dispatch import tokenize
from serving.errors import ServingError, as_serving_error, http_status, pipeline_err_no
from serving.model_host import ModelHost
from serving.pipeline import answer_pipeline
from serving.version import SERVER_NAME, SERVER_VERSION

__all__ = ["BodyLimit", "build_http_app"]

_HEADER_LENGTH = "inference-header-content-length"


def _error(exc: BaseException) -> JSONResponse:
    error = as_serving_error(exc)
    return JSONResponse({"error": error.message}, status_code=http_status(error.kind))


def _parse_oip_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
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
    try:
        document = json.loads(json_part)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ServingError("invalid_argument", f"request body is not valid JSON: {exc}") from None
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
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ServingError(
                "invalid_argument", f"input {name!r}: 'shape' must be a list of integers"
            )
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
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


def _requested_outputs(document: dict[str, Any]) -> list[oip.RequestedOutput]:
    requested = []
    for output in document.get("outputs") or []:
        params = output.get("parameters") or {}
        binary = bool(params["binary_data"]) if "binary_data" in params else None
        requested.append(oip.RequestedOutput(output.get("name"), binary))
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


def _oip_router(host: ModelHost) -> APIRouter:
    router = APIRouter()

    @router.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready")
    async def ready() -> Response:
        ok = host.all_ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @router.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return oip.server_metadata()

    @router.get("/v2/models/{name}")
    @router.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        try:
            return JSONResponse(oip.model_metadata(host, name))
        except ServingError as exc:
            return _error(exc)

    @router.get("/v2/models/{name}/ready")
    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        try:
            ready = oip.model_ready(host, name)
        except ServingError as exc:
            return _error(exc)
        return JSONResponse(ready, status_code=200 if ready["ready"] else 503)

    @router.post("/v2/models/{name}/infer")
    @router.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        try:
            document, binary = _parse_oip_body(
                await request.body(), request.headers.get(_HEADER_LENGTH)
            )
            request_id = document.get("id")
            params = document.get("parameters") or {}
            result = await oip.infer(
                host,
                name,
                _read_inputs(document, binary),
                outputs=_requested_outputs(document),
                binary_default=bool(params.get("binary_data_output", False)),
                request_id=str(request_id) if request_id else None,
            )
        except Exception as exc:
            return _error(exc)
        return _oip_response(result, request_id)

    return router


async def _json_object(request: Request, shape: str) -> dict[str, Any]:
    """The request body as a JSON object; ServingError naming the expected ``shape``."""
    try:
        document = json.loads(await request.body() or b"null")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ServingError(
            "invalid_argument", f"request body is not valid JSON ({exc}); send {shape}"
        ) from None
    if not isinstance(document, dict):
        raise ServingError("invalid_argument", f"request body must be a JSON object like {shape}")
    return document


def _tokenize_router(host: ModelHost) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/tokenize")
    async def count_tokens(request: Request) -> Response:
        """{"model": "ernie", "text": "...", "text_pair": null} -> ids and the billed count."""
        try:
            document = await _json_object(request, '{"model": "<name>", "text": "..."}')
            if "text" not in document:
                raise ServingError("invalid_argument", 'send {"model": "<name>", "text": "..."}')
            name = document.get("model") or host.default_name() or ""
            return JSONResponse(
                await tokenize(host, name, document["text"], document.get("text_pair"))
            )
        except Exception as exc:
            return _error(exc)

    return router


def _pipeline_router(host: ModelHost) -> APIRouter:
    router = APIRouter()

    @router.post("/{name}/{method}")
    async def pipeline(name: str, method: str, request: Request) -> Response:
        # An unreadable body is an HTTP error, as Paddle Serving's gateway makes it; a
        # readable one with bad fields is answered the pipeline way, with err_no.
        try:
            document = await _json_object(request, '{"key": [...], "value": [...]}')
            logid = int(document.get("logid") or 0)
        except (ServingError, ValueError, TypeError) as exc:
            message = exc.message if isinstance(exc, ServingError) else f"bad logid: {exc}"
            return JSONResponse(
                {"err_no": pipeline_err_no("invalid_argument"), "err_msg": message}, status_code=400
            )
        reply = await answer_pipeline(
            host, name, method, document.get("key") or [], document.get("value") or [], (), logid
        )
        return JSONResponse(
            {
                "err_no": reply.err_no,
                "err_msg": reply.err_msg,
                "key": reply.keys,
                "value": reply.values,
            }
        )

    @router.get("/{name}/{method}")
    async def pipeline_get(name: str, method: str) -> Response:
        return JSONResponse(
            {"error": 'use POST with a JSON body {"key": [...], "value": [...]}'},
            status_code=405,
            headers={"Allow": "POST"},
        )

    return router


class BodyLimit:
    """Pure ASGI guard: answer 413 before reading more than ``max_bytes`` of a request body."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send)
            return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, send)

    async def _reject(self, scope: dict[str, Any], send: Callable) -> None:
        body = json.dumps(
            {
                "error": f"request body is larger than the server's limit of {self.max_bytes} bytes "
                "(server.max_message_bytes)"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def build_http_app(host: ModelHost, *, extra_routers: list[APIRouter] = ()) -> FastAPI:
    """The FastAPI app; ``extra_routers`` (metrics, usage, tokenize) go before the pipeline's
    catch-all ``/{name}/{method}`` so it cannot shadow them."""
    app = FastAPI(title=SERVER_NAME, version=SERVER_VERSION, docs_url="/docs", redoc_url=None)
    app.include_router(_oip_router(host))
    app.include_router(_tokenize_router(host))
    for router in extra_routers:
        app.include_router(router)
    app.include_router(_pipeline_router(host))
    return app
