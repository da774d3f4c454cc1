"""API keys: their format, their keyed digest, and the key store in the ledger database.

A key is ``pmk_<key_id>_<secret>``: a 12-character public id ([a-z0-9], shown in ledger
rows, spans, metrics and ``keys list``) and 43 characters of URL-safe base64 (32 random
bytes). The whole string is the secret. The database holds only
``HMAC-SHA256(server_secret, key)`` (auth/secret.py keeps the server secret outside the
database, so the table alone cannot be used to test guesses), compared in constant time,
and a masked hint (``pmk_<id>_<first 4 of secret>…``) for lists. The key itself is shown
once, when created or rotated, and never stored or logged.

:class:`KeyStore` keeps keys in the ledger database (schema v5: ``api_keys``,
``key_events``, ``auth_meta``), SQLite or PostgreSQL, so every worker, replica and the CLI
see the same set. Every statement is written once with ``?`` placeholders and adapted by
:meth:`exporters.ledger.reader.LedgerReader.sql`. ``auth_meta.secret_check`` records an
HMAC of a fixed text under the server secret: a store opened with another secret raises
:class:`SecretMismatch` rather than refusing every key one by one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hmac
import logging
import os
import re
import secrets
import string
from collections.abc import Mapping
from hashlib import sha256
from typing import Any, Final

from auth.roles import ALL_TENANTS, KEY_ROLES
from exporters.ledger.schema import normalize_ts

__all__ = [
    "KEY_PREFIX",
    "ApiKey",
    "KeyStore",
    "SecretMismatch",
    "check_key_fields",
    "KeyDigester",
    "digest_key",
    "parse_expiry",
    "split_key",
]

log = logging.getLogger(__name__)

KEY_PREFIX: Final = "pmk_"
KEY_ID_CHARS: Final = 12
SECRET_CHARS: Final = 43  # token_urlsafe(32): 32 bytes, base64 without padding
KEY_CHARS: Final = len(KEY_PREFIX) + KEY_ID_CHARS + 1 + SECRET_CHARS
MAX_NAME_CHARS: Final = 200
_ID_ALPHABET: Final = string.ascii_lowercase + string.digits
# Applied only to strings of exactly KEY_CHARS characters: no backtracking on long input.
_KEY_SHAPE: Final = re.compile(r"pmk_([a-z0-9]{12})_[A-Za-z0-9_-]{43}")
_SECRET_CHECK_TEXT: Final = b"paddle-meter key store v1"
_ID_ATTEMPTS: Final = 8
_MAX_GRACE_S: Final = 366 * 86400.0
_COLUMNS: Final = (
    "key_id, tenant, role, name, hint, created_at, expires_at, revoked_at, last_used_at, "
    "digest, previous_digest, previous_valid_until"
)
SECRET_MISMATCH_MESSAGE: Final = (
    "the server secret differs from the one the keys were created with: every worker, "
    "replica and the CLI must use the same PADDLE_METER_AUTH_SECRET or auth.secret_file"
)


class SecretMismatch(RuntimeError):
    """The key store was opened with another server secret than its keys were made with."""


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """One key's record (never the key itself). Timestamps: normalize_ts text, UTC."""

    key_id: str
    tenant: str
    role: str
    name: str | None
    hint: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None
    digest: str
    previous_digest: str | None
    previous_valid_until: str | None

    def status(self, now: _dt.datetime) -> str:
        """``revoked``, ``expired`` (at or after expires_at) or ``active``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and normalize_ts(now) >= self.expires_at:
            return "expired"
        return "active"

    def matches(self, digest: str, now: _dt.datetime) -> bool:
        """Whether ``digest`` is this key's, or its previous one within the rotation grace.

        Both comparisons always run (constant work whichever matches, or none).
        """
        current = hmac.compare_digest(digest, self.digest)
        previous = hmac.compare_digest(digest, self.previous_digest or self.digest)
        if self.previous_digest is None or self.previous_valid_until is None:
            return current
        return current or (previous and normalize_ts(now) < self.previous_valid_until)

    def public(self) -> dict[str, Any]:
        """JSON-safe description without digests (lists, the key API, ``--json``)."""
        return {
            "id": self.key_id,
            "masked": self.hint,
            "tenant": self.tenant,
            "role": self.role,
            "name": self.name,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "status": self.status(_dt.datetime.now(_dt.timezone.utc)),
            "previous_valid_until": self.previous_valid_until,
        }


def split_key(presented: str) -> str | None:
    """The key id when ``presented`` has the shape of a key, else None (cheap, no I/O)."""
    if len(presented) != KEY_CHARS or not presented.startswith(KEY_PREFIX):
        return None
    m = _KEY_SHAPE.fullmatch(presented)
    return m.group(1) if m else None


def digest_key(secret: bytes, presented: str) -> str:
    """HMAC-SHA256 of the whole presented key under the server secret (hex)."""
    return hmac.digest(secret, presented.encode("utf-8", "surrogateescape"), "sha256").hex()


class KeyDigester:
    """:func:`digest_key` for one secret, for the per-call check: HMAC (RFC 2104) with the
    secret's inner and outer SHA-256 states computed once, so a call costs two state
    copies and two short hashes (about 1 us here, against 3 us for ``hmac.digest``, whose
    OpenSSL context is built afresh each time). Same result as :func:`digest_key`."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes) -> None:
        block = sha256().block_size
        if len(secret) > block:
            secret = sha256(secret).digest()
        padded = secret.ljust(block, b"\0")
        self._inner = sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = sha256(bytes(b ^ 0x5C for b in padded))

    def __call__(self, presented: str) -> str:
        inner = self._inner.copy()
        inner.update(presented.encode("utf-8", "surrogateescape"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


def parse_expiry(text: str, label: str = "expires") -> _dt.date:
    """The UTC day a key works through, from 'YYYY-MM-DD' (``label`` names the field in
    the message); ValueError for another shape or a day already past."""
    try:
        day = _dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a date YYYY-MM-DD, not {text!r}") from None
    today = _dt.datetime.now(_dt.timezone.utc).date()
    if day < today:
        raise ValueError(
            f"{label} {day.isoformat()} is in the past (today is {today.isoformat()} UTC); "
            "a key works through the UTC day given"
        )
    return day


def check_key_fields(tenant: str, role: str, name: str | None = None) -> None:
    """ValueError with a message for the user when tenant, role or name cannot be a key's."""
    from interceptors.request_id import TENANT_PATTERN

    if role not in KEY_ROLES:
        raise ValueError(f"role must be one of {', '.join(KEY_ROLES)}, not {role!r}")
    if tenant == ALL_TENANTS:
        if role != "auditor":
            raise ValueError(
                f"tenant {ALL_TENANTS!r} (every tenant) is only for role auditor; "
                "an admin key reads every tenant anyway"
            )
    elif not isinstance(tenant, str) or TENANT_PATTERN.fullmatch(tenant) is None:
        raise ValueError(
            "tenant must be 1 to 64 characters of A-Z a-z 0-9 . _ - "
            f"(or {ALL_TENANTS!r} for an auditor of every tenant)"
        )
    if name is not None and (
        len(name) > MAX_NAME_CHARS or not name.isprintable()
    ):
        raise ValueError(f"name must be at most {MAX_NAME_CHARS} printable characters")


def _new_key_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(KEY_ID_CHARS))


def _new_key(key_id: str) -> tuple[str, str]:
    """(key, hint) for ``key_id`` with a fresh secret."""
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}{key_id}_{secret}", f"{KEY_PREFIX}{key_id}_{secret[:4]}\u2026"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _expiry(expires: _dt.date | _dt.datetime | None) -> str | None:
    """The instant a key stops working: after the UTC day ``expires`` (a datetime: itself)."""
    if expires is None:
        return None
    if isinstance(expires, _dt.datetime):
        return normalize_ts(expires)
    if not isinstance(expires, _dt.date):
        raise ValueError(f"expires must be a date, not {type(expires).__name__}")
    day_after = expires + _dt.timedelta(days=1)
    return normalize_ts(_dt.datetime(day_after.year, day_after.month, day_after.day))


def _row_to_key(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(*row)


class KeyStore:
    """API keys in the ledger database (SQLite file or PostgreSQL), keyed by ``secret``.

    Opens short-lived connections through :class:`~exporters.ledger.reader.LedgerReader`
    (migrating the ledger in place; a SQLite ledger that does not exist yet is created,
    0600 in a 0700 directory, as the server would). Raises ValueError for a JSONL ledger,
    SecretMismatch for another server secret, and what the database raises when it
    cannot be reached (LedgerUnavailable for PostgreSQL).
    """

    def __init__(self, ledger_url: str, secret: bytes) -> None:
        from exporters.ledger.reader import LedgerReader, parse_ledger_url

        if not isinstance(secret, bytes | bytearray) or len(secret) < 32:
            raise ValueError("the server secret must be at least 32 bytes (auth/secret.py)")
        self._secret = bytes(secret)
        kind, target = parse_ledger_url(ledger_url)
        if kind == "jsonl":
            from exporters.ledger.dsn import redact_dsn

            raise ValueError(
                "API keys live in the ledger database, which must be SQLite or PostgreSQL; "
                f"{redact_dsn(ledger_url)!r} is a JSONL log"
            )
        if kind == "sqlite" and not os.path.exists(target):
            from exporters.ledger.sqlite import connect_sqlite

            connect_sqlite(target, create=True).close()
        self._reader = LedgerReader(ledger_url)
        self.dialect = self._reader.dialect
        self._integrity = self._integrity_errors()
        self._check_secret()

    def __repr__(self) -> str:
        return f"KeyStore({self._reader!r})"  # the reader's repr redacts a DSN password

    def _integrity_errors(self) -> tuple[type[BaseException], ...]:
        if self.dialect == "postgresql":
            import psycopg

            return (psycopg.IntegrityError,)
        import sqlite3

        return (sqlite3.IntegrityError,)

    def _check_secret(self) -> None:
        check = hmac.new(self._secret, _SECRET_CHECK_TEXT, sha256).hexdigest()
        sql = self._reader.sql
        with self._reader.transaction() as cur:
            # The first store to open the database records the check; concurrent first
            # openers (several workers) agree through the primary key.
            cur.execute(
                sql("INSERT INTO auth_meta (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO NOTHING"),
                ("secret_check", check),
            )
            cur.execute(sql("SELECT value FROM auth_meta WHERE name = ?"), ("secret_check",))
            stored = cur.fetchone()[0]
        if not hmac.compare_digest(str(stored), check):
            raise SecretMismatch(SECRET_MISMATCH_MESSAGE)

    def _event(self, cur: Any, key_id: str, at: str, event: str, actor: str | None,
               detail: str | None = None) -> None:
        cur.execute(
            self._reader.sql(
                "INSERT INTO key_events (key_id, at, event, actor, detail) VALUES (?, ?, ?, ?, ?)"
            ),
            (key_id, at, event, actor, detail),
        )

    def create(
        self,
        *,
        tenant: str,
        role: str,
        name: str | None = None,
        expires: _dt.date | None = None,
        actor: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key: (its record, the key). The key is returned only here: show it once.

        ``expires``: the key works through that UTC day (a past day makes an expired key;
        the CLI refuses those). ValueError for a bad tenant, role or name.
        """
        check_key_fields(tenant, role, name)
        expires_at = _expiry(expires)
        now = normalize_ts(_now())
        sql = self._reader.sql
        for _ in range(_ID_ATTEMPTS):
            key_id = _new_key_id()
            key, hint = _new_key(key_id)
            record = ApiKey(
                key_id=key_id, tenant=tenant, role=role, name=name, hint=hint, created_at=now,
                expires_at=expires_at, revoked_at=None, last_used_at=None,
                digest=digest_key(self._secret, key), previous_digest=None,
                previous_valid_until=None,
            )
            try:
                # One transaction per attempt: in PostgreSQL a failed INSERT aborts it.
                with self._reader.transaction() as cur:
                    cur.execute(
                        sql("INSERT INTO api_keys (key_id, tenant, role, name, hint, digest, "
                            "created_at, expires_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                        (key_id, tenant, role, name, hint, record.digest, now, expires_at, now),
                    )
                    self._event(cur, key_id, now, "created", actor,
                                f"tenant={tenant} role={role}")
            except self._integrity:
                continue  # the id is taken (36**12 ids: practically never); draw another
            log.info("api key created",
                     extra={"api_key_id": key_id, "tenant": tenant, "role": role})
            return record, key
        raise RuntimeError(f"no free key id after {_ID_ATTEMPTS} attempts")

    def get(self, key_id: str) -> ApiKey | None:
        rows = self._reader.fetch_all(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
        )
        return _row_to_key(rows[0]) if rows else None

    def list(self) -> list[ApiKey]:
        """Every key, oldest first."""
        rows = self._reader.fetch_all(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, key_id")
        return [_row_to_key(r) for r in rows]

    def load_all(self) -> dict[str, ApiKey]:
        """Every key by id (what a cache holds)."""
        return {r[0]: _row_to_key(r) for r in self._reader.fetch_all(
            f"SELECT {_COLUMNS} FROM api_keys")}

    def _get_in(self, cur: Any, key_id: str) -> ApiKey | None:
        cur.execute(self._reader.sql(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?"),
                    (key_id,))
        row = cur.fetchone()
        return _row_to_key(tuple(row)) if row else None

    def revoke(self, key_id: str, *, actor: str | None = None) -> ApiKey:
        """Revoke a key (for good); revoking a revoked key changes nothing. KeyError unknown."""
        now = normalize_ts(_now())
        sql = self._reader.sql
        with self._reader.transaction() as cur:
            # Conditional on still being active, so concurrent revokes record one event.
            cur.execute(
                sql("UPDATE api_keys SET revoked_at = ?, updated_at = ? "
                    "WHERE key_id = ? AND revoked_at IS NULL"),
                (now, now, key_id),
            )
            if cur.rowcount == 1:
                self._event(cur, key_id, now, "revoked", actor)
            record = self._get_in(cur, key_id)
        if record is None:
            raise KeyError(f"no API key with id {key_id!r}")
        log.info("api key revoked", extra={"api_key_id": key_id})
        return record

    def rotate(
        self, key_id: str, *, grace_s: float, actor: str | None = None
    ) -> tuple[ApiKey, str]:
        """A new secret for a key (same id, tenant, role); the old key keeps working for
        ``grace_s`` seconds (only the latest previous one: a second rotation within the
        grace ends the first one's). KeyError unknown, ValueError revoked."""
        if not 0 <= grace_s <= _MAX_GRACE_S:  # also NaN; timedelta overflows on inf
            raise ValueError(
                f"grace must be 0 to {_MAX_GRACE_S:g} seconds (a year), not {grace_s!r}"
            )
        now_dt = _now()
        now = normalize_ts(now_dt)
        until = normalize_ts(now_dt + _dt.timedelta(seconds=float(grace_s)))
        sql = self._reader.sql
        with self._reader.transaction() as cur:
            old = self._get_in(cur, key_id)
            if old is None:
                raise KeyError(f"no API key with id {key_id!r}")
            if old.revoked_at is not None:
                raise ValueError(f"API key {key_id} is revoked; create a new key instead")
            key, hint = _new_key(key_id)
            digest = digest_key(self._secret, key)
            # Conditional on the digest read: of two concurrent rotations one wins, and
            # the other fails instead of handing out a key that no longer works.
            cur.execute(
                sql("UPDATE api_keys SET digest = ?, hint = ?, previous_digest = ?, "
                    "previous_valid_until = ?, updated_at = ? WHERE key_id = ? AND digest = ?"),
                (digest, hint, old.digest, until, now, key_id, old.digest),
            )
            if cur.rowcount != 1:
                raise ValueError(f"API key {key_id} was changed meanwhile; rotate it again")
            self._event(cur, key_id, now, "rotated", actor, f"previous valid until {until}")
        log.info("api key rotated", extra={"api_key_id": key_id, "grace_s": grace_s})
        record = dataclasses.replace(
            old, digest=digest, hint=hint, previous_digest=old.digest, previous_valid_until=until
        )
        return record, key

    def touch(self, used: Mapping[str, str]) -> None:
        """Record last-use times (key id -> timestamp); a time never moves backwards."""
        if not used:
            return
        rows = []
        for key_id, ts in used.items():
            at = normalize_ts(ts)
            rows.append((at, key_id, at))
        with self._reader.transaction() as cur:
            cur.executemany(
                self._reader.sql("UPDATE api_keys SET last_used_at = ? WHERE key_id = ? "
                                 "AND (last_used_at IS NULL OR last_used_at < ?)"),
                rows,
            )

    def close(self) -> None:
        """Nothing is held between calls (connections are short-lived); kept for symmetry."""
