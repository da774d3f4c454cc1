"""The admission decision of auth/authenticator.py, in process, over a real SQLite key table.

Every refusal reason (missing, malformed, unknown, wrong secret, revoked, expired, role
without the permission, throttled, key table unreadable) with the error kind the
transports map to 401 / 403 / 429 / 503, a message a person can act on that never echoes
the key, the tenant taken from the key (and from ``x-tenant`` for a gateway only), the
rotation grace, the pipeline's pending admission, and that ``auth.mode: off`` keeps the
caller's ``x-tenant``. The servers' view of the same rules is in tests/test_auth_matrix.py.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth.authenticator import MISSING_KEY_MESSAGE, Authenticator
from auth.cache import KeyCache
from auth.keys import KeyStore
from auth.roles import ALL_TENANTS, Permission
from auth.throttle import FailureThrottle
from serving.errors import ServingError, http_headers, http_status

SECRET = secrets.token_hex(32).encode()
PEER = "ipv4:10.1.2.3:5555"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    keys = KeyStore(f"sqlite:///{tmp_path / 'ledger.sqlite3'}", SECRET)
    yield keys
    keys.close()


def _authenticator(store: KeyStore, *, max_failures: int = 0) -> Authenticator:
    cache = KeyCache(store, ttl_s=60.0, max_stale_s=120.0)
    cache.start()
    return Authenticator(
        "required",
        cache=cache,
        secret=SECRET,
        throttle=FailureThrottle(max_failures, 60.0),
        revocation_bound_s=60.0,
        store=store,
    )


@pytest.fixture
def auth(store: KeyStore) -> Iterator[Authenticator]:
    authenticator = _authenticator(store)
    yield authenticator
    authenticator.cache.close()


def _refusal(auth: Authenticator, permission: Permission, carrier: dict[str, str],
             **kwargs: object) -> ServingError:
    with pytest.raises(ServingError) as caught:
        auth.admit(permission, carrier, PEER, **kwargs)
    return caught.value


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_off_takes_the_tenant_from_x_tenant():
    auth = Authenticator("off")
    admitted = auth.admit(Permission.CALL_MODEL, {"x-tenant": "legal"}, PEER)
    assert (admitted.identity, admitted.tenant, admitted.pending) == (None, "legal", False)
    assert auth.admit(Permission.READ_USAGE, {}, PEER).tenant == "default"


def test_required_needs_a_cache_secret_and_throttle():
    with pytest.raises(ValueError, match="needs a key cache"):
        Authenticator("required")
    with pytest.raises(ValueError, match="off or required"):
        Authenticator("optional")


def test_open_endpoints_need_no_key(auth):
    admitted = auth.admit(Permission.OPEN, {}, PEER)
    assert admitted.identity is None and not admitted.pending


def test_caller_key_bills_its_tenant_whatever_x_tenant_says(auth, store):
    record, key = store.create(tenant="finance", role="caller", name="batch")
    for carrier in (_bearer(key), {"x-api-key": key}, {**_bearer(key), "x-tenant": "legal"}):
        admitted = auth.admit(Permission.CALL_MODEL, carrier, PEER)
        assert admitted.tenant == "finance"
        assert admitted.identity.key_id == record.key_id
        assert admitted.identity.role == "caller"


def test_gateway_key_may_name_the_tenant(auth, store):
    _, key = store.create(tenant="edge", role="gateway")
    assert auth.admit(Permission.CALL_MODEL, {**_bearer(key), "x-tenant": "hr"}, PEER).tenant == "hr"
    assert auth.admit(Permission.CALL_MODEL, _bearer(key), PEER).tenant == "edge"
    refusal = _refusal(auth, Permission.CALL_MODEL, {**_bearer(key), "x-tenant": "no spaces"})
    assert refusal.kind == "invalid_argument"


@pytest.mark.parametrize(
    ("carrier", "reason", "words"),
    [
        ({}, "missing_key", "requires an API key"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "malformed_key", "must be 'Bearer KEY'"),
        ({"authorization": "Bearer "}, "malformed_key", "must be 'Bearer KEY'"),
        (_bearer("sk-not-ours"), "malformed_key", "not in the form this server issues"),
        (_bearer(f"pmk_{'a' * 12}_{'b' * 43}"), "unknown_key", "not valid"),
    ],
    ids=["missing", "basic-scheme", "empty-bearer", "foreign-shape", "unknown-id"],
)
def test_bad_credentials_are_unauthenticated(auth, carrier, reason, words):
    refusal = _refusal(auth, Permission.CALL_MODEL, carrier)
    assert (refusal.kind, refusal.reason) == ("unauthenticated", reason)
    assert words in refusal.message
    assert http_status(refusal.kind) == 401
    assert http_headers(refusal)["WWW-Authenticate"].startswith("Bearer")


def test_missing_key_message_says_how_to_get_one():
    assert "paddle-meter keys create" in MISSING_KEY_MESSAGE
    assert "api_key" in MISSING_KEY_MESSAGE


def test_wrong_secret_of_a_real_id_is_refused_without_echoing_it(auth, store):
    record, key = store.create(tenant="finance", role="caller")
    forged = key[:-6] + ("A" if key[-6] != "A" else "B") + key[-5:]
    refusal = _refusal(auth, Permission.CALL_MODEL, _bearer(forged))
    assert (refusal.kind, refusal.reason) == ("unauthenticated", "wrong_secret")
    secret_part = key.split("_", 2)[2]  # the secret itself may hold "_"
    assert secret_part not in refusal.message and forged not in refusal.message
    assert record.key_id not in refusal.message


def test_revoked_and_expired_keys_say_so(auth, store):
    revoked, revoked_key = store.create(tenant="finance", role="caller")
    _, expired_key = store.create(tenant="finance", role="caller", expires=dt.date(2020, 1, 1))
    store.revoke(revoked.key_id)
    auth.cache.refresh()
    refusal = _refusal(auth, Permission.CALL_MODEL, _bearer(revoked_key))
    assert (refusal.reason, "revoked" in refusal.message) == ("revoked", True)
    refusal = _refusal(auth, Permission.CALL_MODEL, _bearer(expired_key))
    assert (refusal.reason, "expired at 2020-01-02 00:00 UTC" in refusal.message) == ("expired", True)


def test_a_key_expiring_today_still_works(auth, store):
    today = dt.datetime.now(dt.timezone.utc).date()
    _, key = store.create(tenant="finance", role="caller", expires=today)
    assert auth.admit(Permission.CALL_MODEL, _bearer(key), PEER).tenant == "finance"


@pytest.mark.parametrize(
    ("role", "tenant", "permission", "allowed"),
    [
        ("caller", "a", Permission.CALL_MODEL, True),
        ("caller", "a", Permission.READ_USAGE, False),
        ("caller", "a", Permission.MANAGE_KEYS, False),
        ("auditor", "a", Permission.CALL_MODEL, False),
        ("auditor", "a", Permission.READ_USAGE, True),
        ("auditor", ALL_TENANTS, Permission.READ_USAGE, True),
        ("auditor", "a", Permission.MANAGE_KEYS, False),
        ("gateway", "a", Permission.CALL_MODEL, True),
        ("gateway", "a", Permission.READ_USAGE, False),
        ("admin", "a", Permission.CALL_MODEL, True),
        ("admin", "a", Permission.READ_USAGE, True),
        ("admin", "a", Permission.MANAGE_KEYS, True),
    ],
)
def test_roles_and_permissions(auth, store, role, tenant, permission, allowed):
    _, key = store.create(tenant=tenant, role=role)
    if allowed:
        assert auth.admit(permission, _bearer(key), PEER).identity.role == role
        return
    refusal = _refusal(auth, permission, _bearer(key))
    assert (refusal.kind, refusal.reason) == ("permission_denied", "forbidden")
    assert f"a key of role {role} may not" in refusal.message
    assert http_status(refusal.kind) == 403


def test_rotation_keeps_the_old_key_for_the_grace(auth, store):
    record, old = store.create(tenant="finance", role="caller")
    _, new = store.rotate(record.key_id, grace_s=3600)
    auth.cache.refresh()
    for key in (old, new):
        assert auth.admit(Permission.CALL_MODEL, _bearer(key), PEER).identity.key_id == record.key_id
    _, newest = store.rotate(record.key_id, grace_s=0)
    auth.cache.refresh()
    assert auth.admit(Permission.CALL_MODEL, _bearer(newest), PEER).tenant == "finance"
    for key in (old, new):
        assert _refusal(auth, Permission.CALL_MODEL, _bearer(key)).reason == "wrong_secret"


def test_pipeline_calls_are_admitted_pending_and_decided_in_the_handler(auth, store):
    _, key = store.create(tenant="finance", role="caller")
    pending = auth.admit(Permission.CALL_MODEL, {"x-tenant": "legal"}, PEER, body_credential=True)
    assert pending.pending and pending.identity is None
    admitted = auth.admit_body(pending, key, {"x-tenant": "legal"}, PEER)
    assert (admitted.pending, admitted.tenant) == (False, "finance")
    refusal = None
    with pytest.raises(ServingError) as caught:
        auth.admit_body(pending, None, {}, PEER)
    refusal = caught.value
    assert refusal.reason == "missing_key"
    # Where the body may carry a key, even a header key is decided in the handler (so the
    # pipeline answers its refusal as an err_no), and wins over the body's.
    header = auth.admit(Permission.CALL_MODEL, _bearer(key), PEER, body_credential=True)
    assert header.pending
    assert auth.admit_body(header, "pmk_wrong", _bearer(key), PEER).tenant == "finance"
    with pytest.raises(ServingError) as caught:
        auth.admit_body(header, key, _bearer("not-a-key"), PEER)
    assert caught.value.reason == "malformed_key"


def test_repeated_failures_from_one_peer_are_throttled_even_with_a_valid_key(store):
    auth = _authenticator(store, max_failures=3)
    try:
        _, key = store.create(tenant="finance", role="caller")
        for _ in range(3):
            assert _refusal(auth, Permission.CALL_MODEL, _bearer("guess")).reason == "malformed_key"
        refusal = _refusal(auth, Permission.CALL_MODEL, _bearer(key))
        assert (refusal.kind, refusal.reason) == ("rate_limited", "throttled")
        assert http_status(refusal.kind) == 429
        assert 0 < refusal.retry_after_s <= 60
        assert http_headers(refusal)["Retry-After"].isdigit()
        # Another address is not slowed by this one's failures.
        other = auth.admit(Permission.CALL_MODEL, _bearer(key), "ipv4:10.9.9.9:1")
        assert other.tenant == "finance"
    finally:
        auth.cache.close()


def test_permission_denials_do_not_count_as_guesses(store):
    auth = _authenticator(store, max_failures=2)
    try:
        _, key = store.create(tenant="finance", role="auditor")
        for _ in range(5):
            assert _refusal(auth, Permission.CALL_MODEL, _bearer(key)).kind == "permission_denied"
        assert auth.admit(Permission.READ_USAGE, _bearer(key), PEER).tenant == "finance"
    finally:
        auth.cache.close()


def test_an_unread_key_table_refuses_with_unavailable(store):
    cache = KeyCache(store, ttl_s=60.0, max_stale_s=120.0)  # never started: never read
    auth = Authenticator("required", cache=cache, secret=SECRET,
                         throttle=FailureThrottle(0, 60.0))
    _, key = store.create(tenant="finance", role="caller")
    refusal = _refusal(auth, Permission.CALL_MODEL, _bearer(key))
    assert (refusal.kind, refusal.reason) == ("unavailable", "store_unavailable")
    assert http_status(refusal.kind) == 503


def test_from_config_creates_the_secret_file_0600(tmp_path, monkeypatch):
    from serving.config import load_config

    monkeypatch.delenv("PADDLE_METER_AUTH_SECRET", raising=False)
    config = load_config(None, {"server": {"data_dir": str(tmp_path / "data")},
                                "auth": {"mode": "required"}})
    (tmp_path / "data").mkdir(mode=0o700)
    auth = Authenticator.from_config(config, tmp_path / "data")
    try:
        secret_file = tmp_path / "data" / "auth.secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        assert auth.required and auth.revocation_bound_s == config["auth"]["cache_ttl_s"]
        record, key = auth.store.create(tenant="finance", role="caller")
        auth.cache.refresh()
        assert auth.admit(Permission.CALL_MODEL, _bearer(key), PEER).identity.key_id == record.key_id
    finally:
        auth.close()


def test_a_verified_key_is_remembered_only_while_its_row_is_unchanged(auth, store):
    record, key = store.create(tenant="finance", role="caller")
    auth.cache.refresh()
    for _ in range(3):  # the second and third are answered from the verified-key memo
        assert auth.admit(Permission.CALL_MODEL, _bearer(key), PEER).tenant == "finance"
    assert key in auth._verified
    store.revoke(record.key_id)
    auth.cache.refresh()
    assert _refusal(auth, Permission.CALL_MODEL, _bearer(key)).reason == "revoked"
    assert key not in auth._verified
    # A key admitted by its previous secret leaves the memo when its grace ends, with no
    # table change in between.
    record, old = store.create(tenant="finance", role="caller")
    store.rotate(record.key_id, grace_s=1)
    auth.cache.refresh()
    assert auth.admit(Permission.CALL_MODEL, _bearer(old), PEER).tenant == "finance"
    assert auth.admit(Permission.CALL_MODEL, _bearer(old), PEER).tenant == "finance"
    time.sleep(1.2)
    assert _refusal(auth, Permission.CALL_MODEL, _bearer(old)).reason == "wrong_secret"
