"""Admitting a call on every surface: credential -> identity -> permission -> tenant billed.

The metering core asks :meth:`Authenticator.admit` at the start of every call, before any
of the request is used. With ``auth.mode: off`` the tenant is the caller's ``x-tenant``
(as before keys existed). With ``required``:

- the key is read from ``authorization: Bearer KEY`` or ``x-api-key: KEY`` (HTTP headers,
  gRPC metadata); on the pipeline route, whose stock client cannot send headers, the call
  is admitted *pending* and the frontend presents the feed key ``api_key`` through
  :meth:`admit_body` before any model work;
- the key's id picks its row in this worker's copy of the key table (auth/cache.py), and
  HMAC-SHA256(server secret, key) is compared in constant time with the stored digest (and
  with the previous digest during a rotation's grace period); revoked and expired keys are
  refused with a message saying so, but only to a caller who holds the real key;
- the role must hold the endpoint's permission (auth/roles.py), else 403;
- the tenant billed is the key's; only a ``gateway`` key may name it per call in
  ``x-tenant``.

Failures that look like guessing (missing, malformed, unknown, wrong or dead keys) are
counted per peer address (auth/throttle.py); past ``auth.max_failures`` in
``auth.failure_window_s`` every call from that address is refused 429 until the window has
room, whatever key it carries, so a valid key cannot be told apart at speed. Each refusal
is a ServingError with ``reason`` set (the metric label); no message echoes a key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from auth.roles import Identity, Permission
from exporters import semconv as sc
from serving.errors import ServingError

__all__ = [
    "AUTH_FAILURE_KINDS",
    "MISSING_KEY_MESSAGE",
    "Admission",
    "Authenticator",
    "PIPELINE_KEY_FIELD",
    "forbidden_message",
]

log = logging.getLogger(__name__)

#: the pipeline feed key that may carry the API key (removed before the model sees it)
PIPELINE_KEY_FIELD = "api_key"
#: error kinds an admission refuses with
AUTH_FAILURE_KINDS = frozenset({"unauthenticated", "permission_denied", "rate_limited"})

MISSING_KEY_MESSAGE = (
    "this server requires an API key: send 'authorization: Bearer KEY' or 'x-api-key: KEY'"
    " (Paddle Serving pipeline clients: the feed key api_key); an administrator creates"
    " keys with 'paddle-meter keys create'"
)
_MALFORMED = (
    "the API key is not in the form this server issues (pmk_<id>_<secret>); check that it"
    " was copied whole"
)
_INVALID = "the API key is not valid; check it, or ask an administrator for a new one"
_BAD_SCHEME = (
    "the authorization header must be 'Bearer KEY' (or send the key as 'x-api-key: KEY')"
)
_STORE_DOWN = (
    "the key store (the ledger database) has been unreadable for too long to trust its keys;"
    " nothing was served; retry later"
)
_NEEDS = {
    Permission.AUTHENTICATED: "a valid key",
    Permission.CALL_MODEL: "a caller, gateway or admin key",
    Permission.READ_USAGE: "an auditor or admin key",
    Permission.MANAGE_KEYS: "an admin key",
}
_WHAT = {
    Permission.AUTHENTICATED: "use this endpoint",
    Permission.CALL_MODEL: "call models",
    Permission.READ_USAGE: "read usage or bills",
    Permission.MANAGE_KEYS: "manage keys",
}


def forbidden_message(role: str, permission: Permission) -> str:
    return f"a key of role {role} may not {_WHAT[permission]}; this needs {_NEEDS[permission]}"


@dataclasses.dataclass(slots=True)
class Admission:
    """What :meth:`Authenticator.admit` decided: who (None while auth is off, for open
    endpoints, or while ``pending``), the tenant billed, and the permission needed."""

    identity: Identity | None
    tenant: str
    permission: Permission
    pending: bool = False


@dataclasses.dataclass(slots=True)
class _Prepared:
    """One key row in the form the per-call check needs: epochs, not ISO text."""

    row: Any
    identity: Identity
    digest: str
    previous_digest: str | None
    previous_until: float
    expires_at: float | None
    revoked_at: str | None
    expires_text: str | None


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text).timestamp()


class Authenticator:
    """One per serving process. ``mode`` is ``off`` or ``required``; with ``required``
    ``cache`` (auth/cache.py KeyCache, started), ``secret`` and ``throttle`` are needed."""

    def __init__(
        self,
        mode: str = "off",
        *,
        cache: Any | None = None,
        secret: bytes | None = None,
        throttle: Any | None = None,
        metrics_require_key: bool = False,
        revocation_bound_s: float | None = None,
        store: Any | None = None,
        rotation_grace_s: float = 86400.0,
    ) -> None:
        if mode not in ("off", "required"):
            raise ValueError(f"auth.mode must be off or required, not {mode!r}")
        if mode == "required" and (cache is None or secret is None or throttle is None):
            raise ValueError("auth.mode required needs a key cache, the secret and a throttle")
        self.mode = mode
        self.required = mode == "required"
        self.metrics_require_key = metrics_require_key and self.required
        self.revocation_bound_s = revocation_bound_s
        self.cache = cache
        self.store = store  # auth/keys.py KeyStore, for key management over HTTP
        self.rotation_grace_s = rotation_grace_s
        self._secret = secret or b""
        self._throttle = throttle
        self._prepared: dict[str, _Prepared] = {}
        # Keys this worker verified (constant-time HMAC check), so a warm call is a dict
        # read: an entry is used only while the cache holds the very row it was checked
        # against, so a revocation or rotation anywhere ends it within the cache's ttl.
        # Held in this process's memory only, like the request that carried the key.
        self._verified: dict[str, tuple[_Prepared, bool]] = {}
        # Imported here: interceptors/ imports this module's messages at its own import.
        from interceptors.request_id import carried_tenant

        self._carried_tenant = carried_tenant
        if self.required:
            from auth.cache import KeyStoreUnavailable
            from auth.keys import KeyDigester, split_key

            self._split_key, self._digest_key = split_key, KeyDigester(self._secret)
            self._store_down: type[Exception] = KeyStoreUnavailable

    @classmethod
    def from_config(cls, config: Mapping[str, Any], data_dir: Path | None = None) -> Authenticator:
        """Build from the ``auth`` block; with ``required`` this reads the secret (creating
        the file on first use), opens the key table and loads it (raises if it cannot:
        a server that cannot check keys must not start)."""
        settings = config["auth"]
        if settings["mode"] != "required":
            return cls("off")
        from auth.cache import KeyCache
        from auth.keys import KeyStore
        from auth.secret import load_server_secret
        from auth.throttle import FailureThrottle
        from serving.config import auth_secret_path, ledger_url

        secret_file = auth_secret_path(config)
        if data_dir is not None and not settings["secret_file"]:
            secret_file = Path(data_dir) / secret_file.name
        secret = load_server_secret(secret_file, create=True)
        store = KeyStore(ledger_url(config), secret)
        ttl = float(settings["cache_ttl_s"])
        cache = KeyCache(store, ttl_s=ttl, max_stale_s=float(settings["max_stale_s"]))
        cache.start()
        throttle = FailureThrottle(int(settings["max_failures"]), float(settings["failure_window_s"]))
        return cls(
            "required",
            cache=cache,
            secret=secret,
            throttle=throttle,
            metrics_require_key=bool(settings["metrics_require_key"]),
            revocation_bound_s=ttl,
            store=store,
            rotation_grace_s=float(settings["rotation_grace_s"]),
        )

    def close(self) -> None:
        """Stop the key cache (flushes last-used times) and the store; idempotent."""
        if self.cache is not None:
            self.cache.close()
        if self.store is not None:
            self.store.close()

    # -- admission -----------------------------------------------------------------------

    def admit(
        self,
        permission: Permission,
        carrier: Mapping[str, str],
        peer: str | None,
        *,
        body_credential: bool = False,
    ) -> Admission:
        """Admit a call needing ``permission``; raises ServingError (``reason`` set).

        ``carrier``: lower-case headers/metadata; ``peer``: the client's address (for the
        failed-attempt throttle); ``body_credential``: the key may still come in the body
        (pipeline), so the call is admitted pending and decided by :meth:`admit_body` inside
        the handler, where the Paddle Serving protocol answers every refusal as an err_no
        (header key or feed key alike)."""
        if not self.required:
            return Admission(None, self._carried_tenant(carrier), permission)
        if permission is Permission.OPEN:
            return Admission(None, sc.DEFAULT_TENANT, permission)
        if body_credential:
            return Admission(None, "", permission, pending=True)
        return self._admitted(self._header_key(carrier, peer), permission, carrier, peer)

    def admit_body(
        self, pending: Admission, key: str | None, carrier: Mapping[str, str], peer: str | None
    ) -> Admission:
        """Complete a pending admission: the header's key when the call sent one, else the
        key the request body carried (or None: refused)."""
        header_key = self._header_key(carrier, peer)
        chosen = header_key if header_key is not None else (key or None)
        return self._admitted(chosen, pending.permission, carrier, peer)

    def identify(self, key: str | None, peer: str | None) -> Identity:
        """The identity of ``key``; raises ServingError (401 / 429 / 503)."""
        throttle = self._throttle
        retry = throttle.retry_after(peer)
        if retry is not None:
            raise ServingError(
                "rate_limited",
                f"too many failed authentications from this address; retry in {retry:.0f} s",
                retry_after_s=retry,
                reason="throttled",
            )
        if key is None:
            self._fail(peer, "missing_key", MISSING_KEY_MESSAGE)
        verified = self._verified.get(key)
        if verified is not None:
            identity = self._still_valid(verified)
            if identity is not None:
                return identity
            self._verified.pop(key, None)
        key_id = self._split_key(key)
        if key_id is None:
            self._fail(peer, "malformed_key", _MALFORMED)
        try:
            row = self.cache.lookup(key_id)
        except self._store_down as exc:
            raise ServingError("unavailable", _STORE_DOWN, reason="store_unavailable") from exc
        if row is None:
            self._fail(peer, "unknown_key", _INVALID)
        prepared = self._prepared.get(key_id)
        if prepared is None or prepared.row is not row:
            prepared = self._prepared[key_id] = _prepare(row)
        digest = self._digest_key(key)
        now = time.time()
        # Both comparisons always run: the time taken does not say which one matched.
        current = hmac.compare_digest(digest, prepared.digest)
        previous = hmac.compare_digest(digest, prepared.previous_digest or "")
        if not (current or (previous and now < prepared.previous_until)):
            self._fail(peer, "wrong_secret", _INVALID)
        if prepared.revoked_at is not None:
            self._fail(
                peer,
                "revoked",
                f"this API key was revoked ({prepared.revoked_at[:10]}); ask an administrator"
                " for a new one",
            )
        if prepared.expires_at is not None and now >= prepared.expires_at:
            self._fail(
                peer,
                "expired",
                f"this API key expired at {_minute_utc(prepared.expires_text)}; ask an"
                " administrator for a new one",
            )
        self.cache.note_used(key_id)
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()
        self._verified[key] = (prepared, not current)
        return prepared.identity

    def _still_valid(self, verified: tuple[_Prepared, bool]) -> Identity | None:
        """The identity of a key this worker verified before, if nothing has changed since:
        the cache still holds the same row (a revocation or rotation replaces it), it has
        not expired, and a key admitted by its previous secret is still in its grace."""
        prepared, by_previous = verified
        key_id = prepared.identity.key_id
        try:
            row = self.cache.lookup(key_id)
        except self._store_down as exc:
            raise ServingError("unavailable", _STORE_DOWN, reason="store_unavailable") from exc
        if row is not prepared.row or prepared.revoked_at is not None:
            return None
        now = time.time()
        if (prepared.expires_at is not None and now >= prepared.expires_at) or (
            by_previous and now >= prepared.previous_until
        ):
            return None
        self.cache.note_used(key_id)
        return prepared.identity

    def _admitted(
        self,
        key: str | None,
        permission: Permission,
        carrier: Mapping[str, str],
        peer: str | None,
    ) -> Admission:
        identity = self.identify(key, peer)
        if not identity.may(permission):
            raise ServingError(
                "permission_denied", forbidden_message(identity.role, permission), reason="forbidden"
            )
        tenant = identity.tenant
        if identity.role == "gateway" and sc.HEADER_TENANT in carrier:
            tenant = self._carried_tenant(carrier)  # a trusted front names the tenant per call
        return Admission(identity, tenant, permission)

    def _header_key(self, carrier: Mapping[str, str], peer: str | None) -> str | None:
        authorization = carrier.get("authorization")
        if authorization is not None:
            value = authorization[7:]
            if authorization.startswith("Bearer ") and value and value.strip() == value:
                return value  # the usual form, without partitioning and stripping
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                self._fail(peer, "malformed_key", _BAD_SCHEME)
            return value.strip()
        key = carrier.get("x-api-key")
        return key.strip() if key is not None else None

    def _fail(self, peer: str | None, reason: str, message: str) -> NoReturn:
        self._throttle.failed(peer)
        raise ServingError("unauthenticated", message, reason=reason)


_MAX_VERIFIED = 4096


def _prepare(row: Any) -> _Prepared:
    identity = Identity(row.key_id, row.tenant, row.role, row.name)
    return _Prepared(
        row=row,
        identity=identity,
        digest=row.digest,
        previous_digest=row.previous_digest,
        previous_until=_epoch(row.previous_valid_until) or 0.0,
        expires_at=_epoch(row.expires_at),
        revoked_at=row.revoked_at,
        expires_text=row.expires_at,
    )


def _minute_utc(timestamp: str | None) -> str:
    """'2020-01-02T00:00:00.000000+00:00' as '2020-01-02 00:00 UTC' (what a person reads)."""
    if not timestamp:
        return "an unknown time"
    return f"{timestamp[:10]} {timestamp[11:16]} UTC"
