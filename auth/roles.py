"""Roles, permissions, and the permission each endpoint needs.

A key has one role. ``caller`` calls models and is billed to its key's tenant; ``gateway``
is a trusted front that may name the tenant per call in ``x-tenant`` (for every other role
the header is ignored); ``auditor`` reads usage and bills of its tenant, or of every tenant
when its tenant is ``*``; ``admin`` may do everything, key management included.

Endpoints are classified here, once, for both transports: health and readiness are open
(load balancers and scrapers need them), everything else needs a valid key, and model
calls, usage reads and key management need the matching permission.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Final

__all__ = [
    "ALL_TENANTS",
    "Identity",
    "KEY_ROLES",
    "Permission",
    "grpc_permission",
    "http_permission",
    "role_may",
]

ALL_TENANTS: Final = "*"
KEY_ROLES: Final = ("caller", "gateway", "auditor", "admin")


class Permission(enum.Enum):
    OPEN = "open"  # no key needed (health, readiness; /metrics unless configured)
    AUTHENTICATED = "authenticated"  # any valid key (metadata, unknown routes)
    CALL_MODEL = "call_model"  # inference and tokenize
    READ_USAGE = "read_usage"  # /v1/usage, /v1/budgets, /v1/dashboard and bills
    MANAGE_KEYS = "manage_keys"  # /v1/keys


_ROLE_PERMISSIONS: Final = {
    "caller": frozenset({Permission.AUTHENTICATED, Permission.CALL_MODEL}),
    "gateway": frozenset({Permission.AUTHENTICATED, Permission.CALL_MODEL}),
    "auditor": frozenset({Permission.AUTHENTICATED, Permission.READ_USAGE}),
    "admin": frozenset(Permission) - {Permission.OPEN},
}


def role_may(role: str, permission: Permission) -> bool:
    """Whether ``role`` holds ``permission`` (OPEN is held by everyone)."""
    return permission is Permission.OPEN or permission in _ROLE_PERMISSIONS.get(role, ())


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """Who a call is: the key's id (never the key), its tenant and role."""

    key_id: str
    tenant: str
    role: str
    name: str | None = None

    def may(self, permission: Permission) -> bool:
        return role_may(self.role, permission)

    def may_read_tenant(self, tenant: str) -> bool:
        """Whether this identity may read ``tenant``'s usage and bills."""
        return self.role == "admin" or self.tenant in (ALL_TENANTS, tenant)

    @property
    def reads_all_tenants(self) -> bool:
        return self.role == "admin" or self.tenant == ALL_TENANTS


# gRPC: full method path -> permission; methods not listed need AUTHENTICATED.
_OIP = "/inference.GRPCInferenceService/"
_PIPELINE_INFERENCE: Final = "/baidu.paddle_serving.pipeline_serving.PipelineService/inference"
_GRPC_OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
_GRPC: Final = {
    f"{_OIP}ServerLive": Permission.OPEN,
    f"{_OIP}ServerReady": Permission.OPEN,
    f"{_OIP}ModelReady": Permission.OPEN,
    f"{_OIP}ModelInfer": Permission.CALL_MODEL,
    f"{_OIP}ModelStreamInfer": Permission.CALL_MODEL,
    _PIPELINE_INFERENCE: Permission.CALL_MODEL,
}

# HTTP: (method or None for any, path pattern) -> permission, first match wins.
_HTTP: Final = (
    (None, re.compile(r"/v2/health/(live|ready)"), Permission.OPEN),
    (None, re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/ready"), Permission.OPEN),
    (None, re.compile(r"/metrics|/favicon\.ico"), Permission.OPEN),
    # The dashboard's page holds no data: its figures come from /v1/dashboard (a key).
    ("GET", re.compile(r"/dashboard"), Permission.OPEN),
    ("POST", re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer"), Permission.CALL_MODEL),
    ("POST", re.compile(r"/v1/tokenize"), Permission.CALL_MODEL),
    (None, re.compile(r"/v1/usage|/v1/budgets|/v1/dashboard|/v1/bills?(/.*)?"),
     Permission.READ_USAGE),
    (None, re.compile(r"/v1/keys(/.*)?"), Permission.MANAGE_KEYS),
    (None, re.compile(r"/v[12](/.*)?|/docs.*|/openapi\.json|/redoc"), Permission.AUTHENTICATED),
    # PaddleX basic serving's OCR endpoint (serving/paddlex_ocr.py).
    ("POST", re.compile(r"/ocr"), Permission.CALL_MODEL),
    # Paddle Serving's pipeline gateway: POST /{name}/{method}
    ("POST", re.compile(r"/[^/]+/[^/]+"), Permission.CALL_MODEL),
)


def grpc_permission(method: str) -> tuple[Permission, bool]:
    """(permission, key may come in the request body) of a gRPC method path."""
    if method.startswith(_GRPC_OPEN_PREFIXES):
        return Permission.OPEN, False
    return _GRPC.get(method, Permission.AUTHENTICATED), method == _PIPELINE_INFERENCE


def http_permission(method: str, path: str) -> tuple[Permission, bool]:
    """(permission, key may come in the request body) of an HTTP request.

    The body may carry the key (feed key ``api_key``) only on the pipeline gateway route,
    since Paddle Serving's PipelineClient cannot set headers. ``/ocr`` (PaddleX) is
    deferred the same way so that its frontend answers refusals in PaddleX's error shape,
    but it presents no body key (it reads headers only).
    """
    for want, pattern, permission in _HTTP:
        if (want is None or want == method) and pattern.fullmatch(path):
            pipeline = permission is Permission.CALL_MODEL and not path.startswith("/v")
            return permission, pipeline
    return Permission.AUTHENTICATED, False
