"""Key management over HTTP, for admin keys: ``/v1/keys``.

The metering core has already refused anything but an admin key (auth/roles.py:
MANAGE_KEYS); the handlers check again, so the rule holds even if the router is mounted
elsewhere. The new key is in the response of create and rotate only; every other answer
(and the key table) carries its id and masked form. A change is seen by this worker at
once and by every other worker and replica within ``auth.cache_ttl_s``.

While ``auth.mode`` is off there are no admin keys, so the routes answer 403 and point to
the CLI (``paddle-meter keys``), which reads the database directly.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from auth.authenticator import Authenticator
from auth.context import current_identity
from auth.keys import parse_expiry
from auth.roles import Permission

__all__ = ["make_keys_router"]

_OFF = (
    "key management over HTTP needs auth.mode: required and an admin key; with auth off,"
    " use the CLI: paddle-meter keys create|list|revoke|rotate"
)
_CREATE_SHAPE = '{"tenant": "...", "role": "caller|gateway|auditor|admin", "name": "...", "expires": "YYYY-MM-DD"}'


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _StoreDown(Exception):
    """The key table could not be read or written (database down): 503, nothing changed."""


async def _in_store(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a KeyStore call off the event loop; its database errors become _StoreDown
    (KeyError and ValueError pass: they are the caller's 404 and 400)."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except (KeyError, ValueError):
        raise
    except Exception as exc:
        raise _StoreDown(type(exc).__name__) from exc


_STORE_DOWN = "the key store (the ledger database) is unavailable; nothing was changed; retry"


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the body must be JSON like {_CREATE_SHAPE}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"the body must be a JSON object like {_CREATE_SHAPE}")
    return document


def make_keys_router(authenticator: Authenticator) -> APIRouter:
    """``POST /v1/keys``, ``GET /v1/keys``, ``POST /v1/keys/{id}/revoke|rotate``."""
    router = APIRouter()
    store = authenticator.store
    grace_default = authenticator.rotation_grace_s

    def refused() -> JSONResponse | None:
        if store is None:
            return _error(403, _OFF)
        identity = current_identity()
        if identity is None or not identity.may(Permission.MANAGE_KEYS):
            return _error(403, "key management needs an admin key")
        return None

    async def changed() -> None:
        if authenticator.cache is not None:
            await asyncio.to_thread(authenticator.cache.refresh)

    @router.post("/v1/keys", status_code=201)
    async def create_key(request: Request) -> JSONResponse:
        if (refusal := refused()) is not None:
            return refusal
        try:
            document = await _body(request)
            tenant, role = document.get("tenant"), document.get("role")
            if not isinstance(tenant, str) or not isinstance(role, str):
                raise ValueError(f"send {_CREATE_SHAPE} (tenant and role are required)")
            name = document.get("name")
            if name is not None and not isinstance(name, str):
                raise ValueError("name must be a string")
            expires = document.get("expires")
            expires_date = None if expires is None else parse_expiry(expires)
            actor = _actor()
            record, key = await _in_store(
                store.create,
                tenant=tenant,
                role=role,
                name=name,
                expires=expires_date,
                actor=actor,
            )
        except ValueError as exc:
            return _error(400, str(exc))
        except _StoreDown:
            return _error(503, _STORE_DOWN)
        await changed()
        return JSONResponse({"key": key, **record.public()}, status_code=201)

    @router.get("/v1/keys")
    async def list_keys() -> JSONResponse:
        if (refusal := refused()) is not None:
            return refusal
        try:
            records = await _in_store(store.list)
        except _StoreDown:
            return _error(503, _STORE_DOWN)
        return JSONResponse({"keys": [r.public() for r in records]})

    @router.post("/v1/keys/{key_id}/revoke")
    async def revoke_key(key_id: str) -> JSONResponse:
        if (refusal := refused()) is not None:
            return refusal
        try:
            record = await _in_store(store.revoke, key_id, actor=_actor())
        except KeyError:
            return _error(404, f"no key with id {key_id[:40]!r}")
        except _StoreDown:
            return _error(503, _STORE_DOWN)
        await changed()
        return JSONResponse(
            {**record.public(), "refused_everywhere_within_s": authenticator.revocation_bound_s}
        )

    @router.post("/v1/keys/{key_id}/rotate")
    async def rotate_key(key_id: str, request: Request) -> JSONResponse:
        if (refusal := refused()) is not None:
            return refusal
        try:
            document = await _body(request)
            grace = document.get("grace_s", grace_default)
            if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
                raise ValueError("grace_s must be a number of seconds >= 0")
            record, key = await _in_store(
                store.rotate, key_id, grace_s=float(grace), actor=_actor()
            )
        except KeyError:
            return _error(404, f"no key with id {key_id[:40]!r}")
        except ValueError as exc:
            return _error(400, str(exc))
        except _StoreDown:
            return _error(503, _STORE_DOWN)
        await changed()
        return JSONResponse({"key": key, **record.public()})

    return router


def _actor() -> str | None:
    identity = current_identity()
    return f"key:{identity.key_id}" if identity is not None else None
