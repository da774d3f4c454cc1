"""One call on each surface that an API key guards, answered as what the caller saw.

Shared by the authorization tests (tests/test_auth_*.py): `call_surface(server, surface,
credential)` sends one real request (gRPC stubs and httpx on loopback) carrying the key the
way a client of that protocol sends it, and answers an `Answer` whose ``kind`` is the same
word on every transport (``ok``, ``unauthenticated``, ``permission_denied``,
``rate_limited``, or ``other``) and whose ``raw`` is what the wire said (``grpc
UNAUTHENTICATED``, ``http 401``, ``err_no 4001``), so a matrix can assert both.

A `Credential` says where the key goes: ``bearer`` (``authorization: Bearer KEY``),
``x-api-key`` or, on the pipeline surfaces, ``feed`` (the feed key ``api_key`` in the
request's key/value lists, as Paddle Serving's PipelineClient sends it).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import struct
from collections.abc import Mapping
from typing import Any

import grpc
import httpx
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from serving.proto import pipeline_service_pb2 as pipeline_pb
from serving.proto import pipeline_service_pb2_grpc as pipeline_grpc

__all__ = ["MODEL_SURFACES", "SURFACES", "Answer", "Credential", "call_surface"]

MODEL_SURFACES = ("oip_grpc", "oip_http", "pipeline_grpc", "pipeline_http")
SURFACES = (*MODEL_SURFACES, "tokenize", "usage", "keys")
PIPELINE_SURFACES = ("pipeline_grpc", "pipeline_http")

_GRPC_KINDS = {
    grpc.StatusCode.OK: "ok",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limited",
}
_HTTP_KINDS = {200: "ok", 201: "ok", 401: "unauthenticated", 403: "permission_denied",
               429: "rate_limited"}
_ERR_NO_KINDS = {0: "ok", 4001: "unauthenticated", 4003: "permission_denied",
                 4029: "rate_limited"}


@dataclasses.dataclass(frozen=True)
class Credential:
    """A key (None: no key) and where it travels: ``bearer``, ``x-api-key`` or ``feed``."""

    key: str | None
    place: str = "bearer"

    def headers(self, surface: str) -> dict[str, str]:
        if self.key is None or (self.place == "feed" and surface in PIPELINE_SURFACES):
            return {}
        if self.place == "x-api-key":
            return {"x-api-key": self.key}
        return {"authorization": f"Bearer {self.key}"}

    def feed(self, surface: str) -> dict[str, str]:
        if self.key is not None and self.place == "feed" and surface in PIPELINE_SURFACES:
            return {"api_key": self.key}
        return {}


NO_KEY = Credential(None)


@dataclasses.dataclass(frozen=True)
class Answer:
    kind: str
    raw: str
    message: str = ""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    body: Any = None


def _grpc_answer(error: grpc.RpcError) -> Answer:
    code = error.code()
    return Answer(_GRPC_KINDS.get(code, "other"), f"grpc {code.name}", str(error.details()),
                  dict(error.trailing_metadata() or ()))


def _http_answer(reply: httpx.Response, *, pipeline: bool = False) -> Answer:
    body: Any = None
    with contextlib.suppress(ValueError):
        body = reply.json()
    if pipeline and reply.status_code == 200 and isinstance(body, dict):
        err_no = int(body.get("err_no", 0))
        return Answer(_ERR_NO_KINDS.get(err_no, "other"), f"err_no {err_no}",
                      str(body.get("err_msg", "")), dict(reply.headers), body)
    message = ""
    if isinstance(body, dict):
        message = str(body.get("error") or body.get("detail") or body.get("err_msg") or "")
    return Answer(_HTTP_KINDS.get(reply.status_code, "other"), f"http {reply.status_code}",
                  message or reply.text[:300], dict(reply.headers), body)


def call_surface(
    server: Any,
    surface: str,
    credential: Credential = NO_KEY,
    *,
    image: bytes = b"",
    request_id: str | None = None,
    tenant_header: str | None = None,
    usage_tenant: str | None = None,
    text: str = "发票金额 1,234.56 元",
    timeout_s: float = 60.0,
) -> Answer:
    """One request on ``surface`` of ``server`` (a started ServerProcess)."""
    headers = credential.headers(surface)
    if request_id is not None:
        headers["x-request-id"] = request_id
    if tenant_header is not None:
        headers["x-tenant"] = tenant_header
    metadata = list(headers.items())
    try:
        if surface == "oip_grpc":
            with grpc.insecure_channel(server.grpc_address) as channel:
                request = oip_pb.ModelInferRequest(
                    model_name="ocr",
                    inputs=[oip_pb.ModelInferRequest.InferInputTensor(
                        name="image", datatype="BYTES", shape=[1])],
                    raw_input_contents=[struct.pack("<I", len(image)) + image],
                )
                _, call = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
                    request, metadata=metadata, timeout=timeout_s)
                return Answer("ok", "grpc OK", headers=dict(call.trailing_metadata() or ()))
        if surface == "pipeline_grpc":
            fields = {"image": base64.b64encode(image).decode(), **credential.feed(surface)}
            with grpc.insecure_channel(server.grpc_address) as channel:
                reply, call = pipeline_grpc.PipelineServiceStub(channel).inference.with_call(
                    pipeline_pb.Request(key=list(fields), value=list(fields.values()),
                                        name="ocr"),
                    metadata=metadata, timeout=timeout_s)
            return Answer(_ERR_NO_KINDS.get(reply.err_no, "other"), f"err_no {reply.err_no}",
                          reply.err_msg, dict(call.trailing_metadata() or ()),
                          dict(zip(reply.key, reply.value, strict=True)))
    except grpc.RpcError as exc:
        return _grpc_answer(exc)
    with httpx.Client(base_url=server.http_url, timeout=timeout_s) as http:
        if surface == "oip_http":
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": [base64.b64encode(image).decode()]}]}
            return _http_answer(http.post("/v2/models/ocr/infer", json=body, headers=headers))
        if surface == "pipeline_http":
            fields = {"image": base64.b64encode(image).decode(), **credential.feed(surface)}
            body = {"key": list(fields), "value": list(fields.values())}
            return _http_answer(http.post("/ocr/prediction", json=body, headers=headers),
                                pipeline=True)
        if surface == "tokenize":
            return _http_answer(http.post("/v1/tokenize", json={"model": "ernie", "text": text},
                                          headers=headers))
        if surface == "usage":
            params = {"from": "2000-01-01", "to": "2100-01-01", "by": "tenant"}
            if usage_tenant is not None:
                params["tenant"] = usage_tenant
            return _http_answer(http.get("/v1/usage", params=params, headers=headers))
        if surface == "keys":
            return _http_answer(http.get("/v1/keys", headers=headers))
    raise ValueError(f"unknown surface {surface!r}; expected one of {SURFACES}")


def usage_tenants(answer: Answer) -> set[str]:
    """The tenants a /v1/usage answer holds rows of."""
    rows = (answer.body or {}).get("rows", []) if isinstance(answer.body, dict) else []
    return {row.get("tenant") for row in rows}


def dumps(answer: Answer) -> str:
    """The answer for an assertion message."""
    return json.dumps({"kind": answer.kind, "raw": answer.raw, "message": answer.message[:200]},
                      ensure_ascii=False)
