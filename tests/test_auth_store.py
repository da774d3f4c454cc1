"""API key store, key cache, server secret and failure throttle on real databases.

Every store and cache test runs on a real SQLite file and on a fresh database of the real
PostgreSQL server (127.0.0.1:5432). Faults are real: the SQLite file moved away, the
PostgreSQL database made to refuse connections (its backends terminated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import os
import secrets
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.pg import admin_connection, temporary_database

import auth.cache as cache_mod
import auth.keys as keys_mod
from auth.cache import KeyCache, KeyStoreUnavailable
from auth.keys import KeyDigester, KeyStore, SecretMismatch, digest_key, split_key
from auth.secret import SECRET_ENV, load_server_secret
from auth.throttle import FailureThrottle, peer_host
from exporters.ledger.schema import SCHEMA_VERSION

SECRET = secrets.token_hex(32).encode()
UTC = dt.timezone.utc


@dataclasses.dataclass
class Ledger:
    dialect: str
    url: str

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.dialect == "postgresql":
            with psycopg.connect(self.url, autocommit=True) as c:
                return c.execute(sql.replace("?", "%s"), params).fetchall()
        conn = sqlite3.connect(self.url)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    @property
    def dbname(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The database cannot be opened until the block ends (a real fault)."""
        if self.dialect == "sqlite":
            away = self.url + ".away"
            os.rename(self.url, away)
            try:
                yield
            finally:
                os.rename(away, self.url)
            return
        admin = admin_connection()
        try:
            admin.execute(f'ALTER DATABASE "{self.dbname}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.dbname,),
            )
            try:
                yield
            finally:
                admin.execute(f'ALTER DATABASE "{self.dbname}" ALLOW_CONNECTIONS true')
        finally:
            admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        yield Ledger("sqlite", str(tmp_path / "data" / "ledger.sqlite3"))
    else:
        with temporary_database("pm_keys") as url:
            yield Ledger("postgresql", url)


@pytest.fixture
def store(ledger: Ledger) -> Iterator[KeyStore]:
    s = KeyStore(ledger.url, SECRET)
    yield s
    s.close()


class CountingStore(KeyStore):
    """The real store, counting the single-key reads a cache makes."""

    gets = 0

    def get(self, key_id: str):  # type: ignore[override]
        self.gets += 1
        return super().get(key_id)


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def _poll(check: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline_s} s: {what}")
        time.sleep(0.05)


# -- key format -----------------------------------------------------------------------------


def test_key_shape_and_split():
    key_id = "abcdefgh1234"
    key = f"pmk_{key_id}_{secrets.token_urlsafe(32)}"
    assert len(key) == 60 and split_key(key) == key_id
    for bad in (
        "",
        key[:-1],
        key + "A",
        "pmx" + key[3:],
        key.replace(key_id, "ABCDEFGH1234"),  # id is lower case
        key[:16] + "-" + key[17:],  # separator
        key[:-1] + "=",  # padding is not base64url without padding
        key[:-1] + "\u00e9",
        "pmk_" + "a" * 10_000,
        "Bearer " + key,
    ):
        assert split_key(bad) is None, bad
    assert digest_key(SECRET, key) != digest_key(b"x" * 32, key)
    assert len(digest_key(SECRET, key)) == 64


# -- schema ---------------------------------------------------------------------------------


def test_migration_5_creates_the_key_tables(ledger, store):
    assert ledger.query("SELECT MAX(version) FROM schema_migrations") == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION >= 5
    assert ledger.query("SELECT description FROM schema_migrations WHERE version = 5") == [
        ("api_keys, key_events, auth_meta",)
    ]
    for table in ("api_keys", "key_events", "auth_meta"):
        assert ledger.query(f"SELECT COUNT(*) FROM {table}")[0][0] >= 0
    # the first store wrote the secret check
    assert [r[0] for r in ledger.query("SELECT name FROM auth_meta")] == ["secret_check"]


# -- KeyStore -------------------------------------------------------------------------------


def test_create_get_list_revoke(ledger, store):
    rec_a, key_a = store.create(tenant="acme", role="caller", name="ci bot", actor="t")
    rec_b, key_b = store.create(tenant="*", role="auditor")
    now = _now()
    assert split_key(key_a) == rec_a.key_id and split_key(key_b) == rec_b.key_id
    assert rec_a.key_id != rec_b.key_id
    assert rec_a.hint == f"{key_a[:21]}\u2026" and rec_a.hint.startswith(f"pmk_{rec_a.key_id}_")
    assert rec_a.matches(digest_key(SECRET, key_a), now)
    assert not rec_a.matches(digest_key(SECRET, key_b), now)
    assert not rec_a.matches(digest_key(b"y" * 32, key_a), now)
    assert store.get(rec_a.key_id) == rec_a
    assert store.get("nosuchkey000") is None
    assert [r.key_id for r in store.list()] == [rec_a.key_id, rec_b.key_id]
    assert store.load_all() == {rec_a.key_id: rec_a, rec_b.key_id: rec_b}
    assert rec_a.status(now) == "active" and rec_a.expires_at is None

    public = rec_a.public()
    assert public["id"] == rec_a.key_id and public["masked"] == rec_a.hint
    assert public["status"] == "active" and public["tenant"] == "acme"
    assert rec_a.digest not in str(public) and key_a not in str(public)
    assert not any("digest" in k for k in public)

    revoked = store.revoke(rec_a.key_id, actor="t")
    assert revoked.revoked_at is not None and revoked.status(_now()) == "revoked"
    assert store.get(rec_a.key_id).status(_now()) == "revoked"
    again = store.revoke(rec_a.key_id)  # idempotent: same time, no second event
    assert again.revoked_at == revoked.revoked_at
    events = ledger.query("SELECT event, actor FROM key_events WHERE key_id = ? ORDER BY id",
                          (rec_a.key_id,))
    assert events == [("created", "t"), ("revoked", "t")]
    assert store.get(rec_b.key_id).status(_now()) == "active"
    with pytest.raises(KeyError):
        store.revoke("nosuchkey000")


def test_rotate_keeps_the_old_key_for_the_grace_only(ledger, store):
    rec, old_key = store.create(tenant="acme", role="caller")
    old = digest_key(SECRET, old_key)
    new_rec, new_key = store.rotate(rec.key_id, grace_s=1.0, actor="t")
    new = digest_key(SECRET, new_key)
    assert split_key(new_key) == rec.key_id and new_key != old_key
    stored = store.get(rec.key_id)
    assert stored == new_rec
    assert (stored.tenant, stored.role, stored.created_at) == (rec.tenant, rec.role,
                                                               rec.created_at)
    assert stored.hint == f"{new_key[:21]}\u2026" != rec.hint
    assert stored.previous_digest == old and stored.digest == new
    now = _now()
    assert stored.matches(new, now) and stored.matches(old, now)
    until = dt.datetime.fromisoformat(stored.previous_valid_until)
    assert stored.matches(old, until - dt.timedelta(milliseconds=1))
    assert not stored.matches(old, until)
    assert stored.matches(new, until + dt.timedelta(days=1))
    # and in real time: the old key stops matching once the grace has passed
    _poll(lambda: not store.get(rec.key_id).matches(old, _now()), "old key refused")
    assert store.get(rec.key_id).matches(new, _now())

    # no grace: the old key stops at once
    _, newer_key = store.rotate(rec.key_id, grace_s=0)
    latest = store.get(rec.key_id)
    assert not latest.matches(new, _now()) and latest.matches(digest_key(SECRET, newer_key),
                                                              _now())
    assert [e for (e,) in ledger.query(
        "SELECT event FROM key_events WHERE key_id = ? ORDER BY id", (rec.key_id,))] == [
        "created", "rotated", "rotated"]

    with pytest.raises(KeyError):
        store.rotate("nosuchkey000", grace_s=1)
    with pytest.raises(ValueError):
        store.rotate(rec.key_id, grace_s=-1)
    with pytest.raises(ValueError):
        store.rotate(rec.key_id, grace_s=float("inf"))
    store.revoke(rec.key_id)
    with pytest.raises(ValueError, match="revoked"):
        store.rotate(rec.key_id, grace_s=1)


def test_expiry(store):
    today = _now().date()
    past, _ = store.create(tenant="acme", role="caller", expires=today - dt.timedelta(days=1))
    assert past.status(_now()) == "expired"
    assert store.get(past.key_id).status(_now()) == "expired"
    assert past.public()["status"] == "expired"
    current, _ = store.create(tenant="acme", role="caller", expires=today)
    tomorrow = today + dt.timedelta(days=1)
    assert current.expires_at == f"{tomorrow.isoformat()}T00:00:00.000000+00:00"
    assert current.status(_now()) == "active"
    end = dt.datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC)
    assert current.status(end - dt.timedelta(microseconds=1)) == "active"
    assert current.status(end) == "expired"
    # a revoked key reads revoked whatever its expiry
    assert store.revoke(past.key_id).status(_now()) == "revoked"


@pytest.mark.parametrize(
    ("tenant", "role", "name", "message"),
    [
        ("acme", "boss", None, "role must be one of"),
        ("*", "caller", None, "only for role auditor"),
        ("*", "admin", None, "only for role auditor"),
        ("ac me", "caller", None, "tenant must be"),
        ("", "caller", None, "tenant must be"),
        ("a" * 65, "caller", None, "tenant must be"),
        ("acme", "caller", "x" * 201, "name must be"),
        ("acme", "caller", "line\nbreak", "name must be"),
    ],
)
def test_create_refuses_bad_fields(tmp_path, tenant, role, name, message):
    store = KeyStore(str(tmp_path / "l.sqlite3"), SECRET)
    with pytest.raises(ValueError, match=message):
        store.create(tenant=tenant, role=role, name=name)
    assert store.list() == []


def test_jsonl_ledger_and_short_secret_refused(tmp_path):
    with pytest.raises(ValueError, match="SQLite or PostgreSQL"):
        KeyStore(f"jsonl://{tmp_path}/l.jsonl", SECRET)
    with pytest.raises(ValueError, match="32 bytes"):
        KeyStore(str(tmp_path / "l.sqlite3"), b"short")


def test_secret_mismatch_refused(ledger, store):
    rec, key = store.create(tenant="acme", role="caller")
    other = secrets.token_hex(32).encode()
    with pytest.raises(SecretMismatch, match="PADDLE_METER_AUTH_SECRET"):
        KeyStore(ledger.url, other)
    # the check is not replaced by the refused store: the right secret still opens it
    again = KeyStore(ledger.url, SECRET)
    assert again.get(rec.key_id).matches(digest_key(SECRET, key), _now())


def test_two_stores_opening_a_new_database_at_once_agree(ledger):
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_one() -> None:
        barrier.wait()
        try:
            KeyStore(ledger.url, SECRET)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ledger.query("SELECT value FROM auth_meta")) == 1


def test_key_id_collision_draws_another(ledger, store, monkeypatch):
    first, _ = store.create(tenant="acme", role="caller")
    drawn = iter([first.key_id, first.key_id, "fresh0000001"])
    monkeypatch.setattr(keys_mod, "_new_key_id", lambda: next(drawn))
    rec, key = store.create(tenant="other", role="caller")
    assert rec.key_id == "fresh0000001" and split_key(key) == "fresh0000001"
    assert store.get(first.key_id) == first  # the existing key is untouched
    assert len(store.list()) == 2


def test_touch_keeps_the_latest_use(store):
    rec, _ = store.create(tenant="acme", role="caller")
    store.touch({rec.key_id: "2026-05-01T10:00:00+00:00"})
    store.touch({rec.key_id: "2026-04-01T10:00:00+00:00", "nosuchkey000": "2026-04-01"})
    assert store.get(rec.key_id).last_used_at == "2026-05-01T10:00:00.000000+00:00"
    store.touch({rec.key_id: "2026-06-01T10:00:00Z"})
    assert store.get(rec.key_id).last_used_at == "2026-06-01T10:00:00.000000+00:00"


def test_the_key_is_never_stored(ledger, store, tmp_path):
    made = [store.create(tenant="acme", role="caller", name="n")]
    made.append(store.create(tenant="*", role="auditor"))
    rotated = store.rotate(made[0][0].key_id, grace_s=60)
    made.append(rotated)
    store.revoke(made[1][0].key_id)
    store.touch({made[0][0].key_id: _now().isoformat()})
    if ledger.dialect == "sqlite":
        blob = b"".join(
            Path(p).read_bytes()
            for p in (ledger.url, ledger.url + "-wal", ledger.url + "-shm")
            if os.path.exists(p)
        )
    else:
        blob = subprocess.run(
            ["pg_dump", "--data-only", ledger.url], capture_output=True, check=True, timeout=60
        ).stdout
    for rec, key in made:
        assert rec.key_id.encode() in blob  # the search does find what is stored
        assert store.get(rec.key_id).digest.encode() in blob
        secret_part = key.split("_", 2)[2]
        assert key.encode() not in blob
        assert secret_part.encode() not in blob
        assert secret_part[4:].encode() not in blob  # only 4 characters make the hint
    assert SECRET not in blob


# -- server secret --------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)


def test_secret_file_created_0600_and_reused(tmp_path, no_env):
    path = tmp_path / "data" / "auth.secret"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_server_secret(path, create=False)
    assert not path.exists()
    secret = load_server_secret(path, create=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert len(text) == 65 and text.endswith("\n") and int(text, 16) >= 0
    assert secret == text.strip().encode()
    assert load_server_secret(path, create=True) == secret
    assert load_server_secret(path, create=False) == secret
    assert [p.name for p in path.parent.iterdir()] == ["auth.secret"]  # no temporary left


def test_secret_file_with_loose_mode_refused(tmp_path, no_env):
    path = tmp_path / "auth.secret"
    load_server_secret(path, create=True)
    for loose in (0o644, 0o640, 0o604):
        path.chmod(loose)
        with pytest.raises(PermissionError, match=f"chmod 600 {path}"):
            load_server_secret(path, create=False)
    path.chmod(0o600)
    assert load_server_secret(path, create=False)


def test_short_secret_file_refused(tmp_path, no_env):
    path = tmp_path / "auth.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"tooshort\n")
    os.close(fd)
    with pytest.raises(ValueError, match="fewer than 32"):
        load_server_secret(path, create=True)


def test_env_var_wins(tmp_path, monkeypatch):
    path = tmp_path / "auth.secret"
    monkeypatch.delenv(SECRET_ENV, raising=False)
    from_file = load_server_secret(path, create=True)
    value = "e" * 40
    monkeypatch.setenv(SECRET_ENV, value)
    assert load_server_secret(path, create=False) == value.encode() != from_file
    path.chmod(0o644)  # the file is not even read
    assert load_server_secret(path, create=False) == value.encode()
    missing = tmp_path / "none" / "auth.secret"
    assert load_server_secret(missing, create=True) == value.encode()
    assert not missing.parent.exists()
    monkeypatch.setenv(SECRET_ENV, "x" * 31)
    with pytest.raises(ValueError, match="at least 32 characters"):
        load_server_secret(path, create=False)


def test_concurrent_secret_creation_agrees(tmp_path, no_env):
    path = tmp_path / "auth.secret"
    barrier = threading.Barrier(8)
    got: list[bytes] = []

    def load() -> None:
        barrier.wait()
        got.append(load_server_secret(path, create=True))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["auth.secret"]


# -- KeyCache -------------------------------------------------------------------------------


@pytest.fixture
def other(ledger: Ledger) -> KeyStore:
    """A second store on the same database: the CLI or another replica."""
    return KeyStore(ledger.url, SECRET)


def test_lookup_before_start_refused(store):
    cache = KeyCache(store, ttl_s=1, max_stale_s=10)
    with pytest.raises(KeyStoreUnavailable):
        cache.lookup("abcdefabcdef")


def test_key_created_after_start_is_found_at_once(ledger, other):
    store = CountingStore(ledger.url, SECRET)
    before, _ = other.create(tenant="acme", role="caller")
    cache = KeyCache(store, ttl_s=60, max_stale_s=600)
    cache.start()
    try:
        assert cache.lookup(before.key_id) == before
        assert store.gets == 0  # in the copy: no read
        rec, key = other.create(tenant="acme", role="caller")
        found = cache.lookup(rec.key_id)
        assert found == rec and found.matches(digest_key(SECRET, key), _now())
        assert store.gets == 1
        assert cache.lookup(rec.key_id) == rec
        assert store.gets == 1  # now in the copy
    finally:
        cache.close()


def test_revoke_seen_after_refresh(store, other):
    rec, _ = other.create(tenant="acme", role="caller")
    cache = KeyCache(store, ttl_s=60, max_stale_s=600)
    cache.start()
    try:
        assert cache.lookup(rec.key_id).status(_now()) == "active"
        other.revoke(rec.key_id)
        cache.refresh()
        assert cache.lookup(rec.key_id).status(_now()) == "revoked"
    finally:
        cache.close()


def test_revoke_and_rotation_seen_within_ttl(store, other):
    rec, key = other.create(tenant="acme", role="caller")
    victim, _ = other.create(tenant="acme", role="caller")
    cache = KeyCache(store, ttl_s=0.3, max_stale_s=30)
    cache.start()
    try:
        old = digest_key(SECRET, key)
        assert cache.lookup(rec.key_id).matches(old, _now())
        other.revoke(victim.key_id)
        _, new_key = other.rotate(rec.key_id, grace_s=0)
        _poll(lambda: cache.lookup(victim.key_id).status(_now()) == "revoked",
              "revocation seen by the cache")
        _poll(lambda: not cache.lookup(rec.key_id).matches(old, _now()),
              "rotation seen by the cache")
        assert cache.lookup(rec.key_id).matches(digest_key(SECRET, new_key), _now())
    finally:
        cache.close()


def test_last_used_flushed(store, other):
    a, _ = other.create(tenant="acme", role="caller")
    b, _ = other.create(tenant="acme", role="caller")
    cache = KeyCache(store, ttl_s=0.2, max_stale_s=30)
    cache.start()
    started = _now().isoformat()
    try:
        cache.note_used(a.key_id)
        _poll(lambda: other.get(a.key_id).last_used_at is not None, "last use written")
        assert other.get(a.key_id).last_used_at >= started[:19]
        assert other.get(b.key_id).last_used_at is None
        cache.note_used(b.key_id)
    finally:
        cache.close()  # the final flush writes b's use
    assert other.get(b.key_id).last_used_at is not None
    cache.close()  # idempotent


def test_last_use_written_by_close_without_a_tick(store, other):
    rec, _ = other.create(tenant="acme", role="caller")
    cache = KeyCache(store, ttl_s=60, max_stale_s=600)
    cache.start()
    cache.note_used(rec.key_id)
    assert other.get(rec.key_id).last_used_at is None
    cache.close()
    assert other.get(rec.key_id).last_used_at is not None


def test_unreadable_store_refused_after_max_stale(ledger, store, other):
    rec, _ = other.create(tenant="acme", role="caller")
    cache = KeyCache(store, ttl_s=0.2, max_stale_s=1.0)
    cache.start()
    try:
        assert cache.lookup(rec.key_id) == rec
        with ledger.outage():
            with pytest.raises(Exception):  # noqa: B017 - whatever the database raises
                store.load_all()  # the fault is real: the store cannot read

            def refused() -> bool:
                try:
                    cache.lookup(rec.key_id)
                except KeyStoreUnavailable:
                    return True
                return False

            _poll(refused, "KeyStoreUnavailable once the copy is older than max_stale_s")
            assert cache.stale_s() > 1.0
            with pytest.raises(KeyStoreUnavailable, match="auth.max_stale_s"):
                cache.lookup("nosuchkey000")
        # the database is back: the next tick reads it again and lookups work
        _poll(lambda: not refused(), "lookups work again after the outage")
        assert cache.lookup(rec.key_id) == rec
    finally:
        cache.close()


def test_start_raises_when_the_store_cannot_be_read(ledger, store):
    cache = KeyCache(store, ttl_s=0.2, max_stale_s=1.0)
    with ledger.outage(), pytest.raises(Exception):  # noqa: B017 - what the database raises
        cache.start()
    with pytest.raises(KeyStoreUnavailable):
        cache.lookup("abcdefabcdef")
    cache.close()


def test_unknown_id_costs_one_read_per_ttl(ledger):
    store = CountingStore(ledger.url, SECRET)
    cache = KeyCache(store, ttl_s=60, max_stale_s=600)
    cache.start()
    try:
        for _ in range(50):
            assert cache.lookup("nosuchkey000") is None
        assert store.gets == 1
        barrier = threading.Barrier(8)

        def many() -> None:
            barrier.wait()
            for _ in range(20):
                assert cache.lookup("nosuchkey001") is None

        threads = [threading.Thread(target=many) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.gets == 2  # one read for the second id, whatever the concurrency
    finally:
        cache.close()

    short = KeyCache(store, ttl_s=0.3, max_stale_s=600)
    short.start()
    try:
        store.gets = 0
        assert short.lookup("nosuchkey002") is None
        time.sleep(0.5)  # past the ttl: the miss is forgotten and the id read again
        assert short.lookup("nosuchkey002") is None
        assert store.gets == 2
    finally:
        short.close()


def test_a_key_created_after_a_miss_is_found_after_ttl(ledger, other, monkeypatch):
    store = CountingStore(ledger.url, SECRET)
    cache = KeyCache(store, ttl_s=0.3, max_stale_s=600)
    cache.start()
    try:
        assert cache.lookup("later0000001") is None  # the miss is remembered for ttl_s
        monkeypatch.setattr(keys_mod, "_new_key_id", lambda: "later0000001")
        later, _ = other.create(tenant="acme", role="caller")
        _poll(lambda: cache.lookup("later0000001") == later, "key found once the miss expired")
    finally:
        cache.close()


def test_remembered_misses_are_bounded(store, monkeypatch):
    monkeypatch.setattr(cache_mod, "MAX_REMEMBERED_MISSES", 5)
    cache = KeyCache(store, ttl_s=60, max_stale_s=600)
    cache.start()
    try:
        for i in range(20):
            assert cache.lookup(f"nosuch{i:06d}") is None
        assert len(cache._misses) == 5
        assert list(cache._misses) == [f"nosuch{i:06d}" for i in range(15, 20)]
    finally:
        cache.close()


# -- FailureThrottle ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_throttle_sliding_window():
    clock = Clock()
    th = FailureThrottle(3, 10.0, clock=clock)
    assert th.retry_after("ipv4:10.0.0.1:5000") is None
    for dt_s in (0.0, 1.0, 2.0):
        clock.t = 1000.0 + dt_s
        assert th.retry_after("ipv4:10.0.0.1:5000") is None
        th.failed("ipv4:10.0.0.1:5000")
    # three failures within the window: refused until the first leaves it (t = 1010)
    assert th.retry_after("ipv4:10.0.0.1:6000") == pytest.approx(8.0)
    assert th.retry_after("10.0.0.1") == pytest.approx(8.0)  # same host, any port
    assert th.retry_after("ipv4:10.0.0.2:5000") is None  # another peer is not affected
    clock.t = 1009.5
    assert th.retry_after("10.0.0.1") == pytest.approx(0.5)
    clock.t = 1010.0
    assert th.retry_after("10.0.0.1") is None
    th.failed("10.0.0.1")  # back at three within the window (1001, 1002, 1010)
    assert th.retry_after("10.0.0.1") == pytest.approx(1.0)
    clock.t = 1030.0
    assert th.retry_after("10.0.0.1") is None
    assert len(th) == 0  # an emptied window is forgotten


def test_throttle_peer_forms():
    assert peer_host("ipv4:127.0.0.1:54321") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:54321") == "::1"
    assert peer_host("ipv6:%5B::1%5D:54321") == "::1"
    assert peer_host("[2001:db8::1]:443") == "2001:db8::1"
    assert peer_host("::1") == "::1"
    assert peer_host("127.0.0.1") == "127.0.0.1"
    assert peer_host("127.0.0.1:8000") == "127.0.0.1"
    assert peer_host(None) == peer_host("") == "unknown"
    clock = Clock()
    th = FailureThrottle(2, 5.0, clock=clock)
    th.failed("ipv6:[::1]:1")
    th.failed("ipv6:%5B::1%5D:2")
    assert th.retry_after("::1") == pytest.approx(5.0)
    assert th.retry_after("127.0.0.1") is None


def test_throttle_memory_bounded_and_off():
    clock = Clock()
    th = FailureThrottle(1, 60.0, max_peers=3, clock=clock)
    for i in range(10):
        clock.t += 1
        th.failed(f"10.0.0.{i}")
    assert len(th) == 3
    assert th.retry_after("10.0.0.9") is not None and th.retry_after("10.0.0.0") is None
    off = FailureThrottle(0, 60.0, clock=clock)
    for _ in range(100):
        off.failed("10.0.0.1")
    assert off.retry_after("10.0.0.1") is None
    with pytest.raises(ValueError):
        FailureThrottle(3, 0)


def test_throttle_threads():
    th = FailureThrottle(50, 60.0)
    barrier = threading.Barrier(8)

    def hammer(n: int) -> None:
        barrier.wait()
        for i in range(2000):
            th.failed(f"10.1.{n}.{i % 7}")
            th.retry_after(f"10.1.{n}.{i % 7}")

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(th) == 56
    assert all(th.retry_after(f"10.1.{n}.{i}") is not None for n in range(8) for i in range(7))


@pytest.mark.parametrize("secret_bytes", [0, 1, 32, 63, 64, 65, 200])
def test_the_per_call_digester_equals_hmac_sha256(secret_bytes):
    secret = secrets.token_bytes(secret_bytes)
    digester = KeyDigester(secret)
    for presented in ("pmk_abcdefghijkl_" + "x" * 43, "", "ключ\udcff", "k" * 500):
        assert digester(presented) == digest_key(secret, presented)
        assert digester(presented) == hmac.new(
            secret, presented.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
