"""``paddle-meter keys ...``: the installed console script run as a subprocess.

Each test gets a temporary config (PADDLE_METER_CONFIG) whose data dir is a temp dir; the
keys live in that data dir's SQLite ledger, or with ``ledger.url`` in a fresh database of
the real PostgreSQL server. What the commands write is checked in the database itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.pg import temporary_database

from auth.keys import KeyStore, digest_key, split_key
from auth.secret import SECRET_ENV, load_server_secret

EXE = str(Path(sys.executable).with_name("paddle-meter"))


@dataclasses.dataclass
class Cli:
    config: Path
    data_dir: Path
    ledger_url: str
    dialect: str

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
        environ["PADDLE_METER_CONFIG"] = str(self.config)
        environ.update(env or {})
        return subprocess.run(
            [EXE, *args], capture_output=True, text=True, env=environ, timeout=120,
            cwd=str(self.data_dir.parent),
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        return proc

    @property
    def secret_file(self) -> Path:
        return self.data_dir / "auth.secret"

    def store(self) -> KeyStore:
        return KeyStore(self.ledger_url, load_server_secret(self.secret_file, create=False))


@pytest.fixture(params=["sqlite", "postgresql"])
def cli(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> Iterator[Cli]:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    data_dir = tmp_path / "data"
    config = tmp_path / "paddle-meter.yaml"
    with temporary_database("pm_keycli") if request.param == "postgresql" else (
        _nothing()
    ) as pg_url:
        settings: dict = {"server": {"data_dir": str(data_dir)}, "auth": {"cache_ttl_s": 3}}
        if pg_url:
            settings["ledger"] = {"url": pg_url}
        config.write_text(yaml.safe_dump(settings))
        url = pg_url or str(data_dir / "ledger.sqlite3")
        yield Cli(config, data_dir, url, request.param)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_create_prints_the_key_alone(cli):
    proc = cli.ok("keys", "create", "--tenant", "acme", "--role", "caller", "--name", "ci bot")
    key = proc.stdout.strip()
    assert proc.stdout == key + "\n"
    key_id = split_key(key)
    assert key_id is not None
    assert f"created key {key_id} for tenant acme (role caller)" in proc.stderr
    assert "shown only now" in proc.stderr and key not in proc.stderr
    # the secret was created private in the data dir, and the stored digest is the key's
    assert stat.S_IMODE(cli.secret_file.stat().st_mode) == 0o600
    secret = load_server_secret(cli.secret_file, create=False)
    record = cli.store().get(key_id)
    assert (record.tenant, record.role, record.name) == ("acme", "caller", "ci bot")
    assert record.digest == digest_key(secret, key)
    assert record.status(dt.datetime.now(dt.timezone.utc)) == "active"


def test_create_json(cli):
    proc = cli.ok("keys", "create", "--tenant", "*", "--role", "auditor", "--json",
                  "--expires", "2099-12-31")
    out = json.loads(proc.stdout)
    assert split_key(out["key"]) == out["id"]
    assert out["tenant"] == "*" and out["role"] == "auditor" and out["status"] == "active"
    assert out["masked"] == out["key"][:21] + "\u2026"
    assert out["expires_at"] == "2100-01-01T00:00:00.000000+00:00"
    assert not any("digest" in k for k in out)
    assert cli.store().get(out["id"]).digest not in proc.stdout


def test_list_is_masked(cli):
    keys = [cli.ok("keys", "create", "--tenant", t, "--role", r).stdout.strip()
            for t, r in (("acme", "caller"), ("beta", "gateway"), ("*", "auditor"))]
    ids = [split_key(k) for k in keys]
    cli.ok("keys", "revoke", ids[1])
    proc = cli.ok("keys", "list")
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["id", "masked", "tenant", "role", "name", "created", "last",
                                "used", "expires", "status"]
    assert set(lines[1]) <= {"-", " "}
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ids
    assert [r[-1] for r in rows] == ["active", "revoked", "active"]
    assert [r[2] for r in rows] == ["acme", "beta", "*"]
    store = cli.store()
    for key, key_id, row in zip(keys, ids, rows, strict=True):
        assert row[1] == key[:21] + "\u2026"
        assert key not in proc.stdout and key.split("_", 2)[2] not in proc.stdout
        assert store.get(key_id).digest not in proc.stdout
    listed = json.loads(cli.ok("keys", "list", "--json").stdout)["keys"]
    assert [k["id"] for k in listed] == ids
    assert [k["status"] for k in listed] == ["active", "revoked", "active"]
    text = json.dumps(listed)
    assert "digest" not in text and not any(k in text for k in keys)


def test_revoke(cli):
    key = cli.ok("keys", "create", "--tenant", "acme", "--role", "caller").stdout.strip()
    key_id = split_key(key)
    proc = cli.ok("keys", "revoke", key_id)
    assert proc.stdout.strip() == f"revoked {key_id}; every server refuses it within 3 s"
    assert cli.store().get(key_id).revoked_at is not None
    again = cli.ok("keys", "revoke", key_id)  # idempotent
    assert "already revoked" in again.stdout


def test_rotate(cli):
    old = cli.ok("keys", "create", "--tenant", "acme", "--role", "caller").stdout.strip()
    key_id = split_key(old)
    proc = cli.ok("keys", "rotate", key_id, "--grace", "600")
    new = proc.stdout.strip()
    assert proc.stdout == new + "\n" and split_key(new) == key_id and new != old
    assert f"rotated key {key_id}; the old key works until" in proc.stderr
    secret = load_server_secret(cli.secret_file, create=False)
    record = cli.store().get(key_id)
    now = dt.datetime.now(dt.timezone.utc)
    assert record.matches(digest_key(secret, new), now)
    assert record.matches(digest_key(secret, old), now)  # within the grace
    until = dt.datetime.fromisoformat(record.previous_valid_until)
    assert dt.timedelta(seconds=590) < until - now <= dt.timedelta(seconds=600)

    out = json.loads(cli.ok("keys", "rotate", key_id, "--grace", "0", "--json").stdout)
    assert out["id"] == key_id and split_key(out["key"]) == key_id
    record = cli.store().get(key_id)
    now = dt.datetime.now(dt.timezone.utc)
    assert record.matches(digest_key(secret, out["key"]), now)
    assert not record.matches(digest_key(secret, new), now)
    assert not record.matches(digest_key(secret, old), now)


def test_rotate_default_grace_is_the_configured_one(cli):
    settings = yaml.safe_load(cli.config.read_text())
    settings["auth"]["rotation_grace_s"] = 120
    cli.config.write_text(yaml.safe_dump(settings))
    key_id = split_key(cli.ok("keys", "create", "--tenant", "a", "--role", "admin").stdout.strip())
    cli.ok("keys", "rotate", key_id)
    record = cli.store().get(key_id)
    until = dt.datetime.fromisoformat(record.previous_valid_until)
    left = until - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(seconds=100) < left <= dt.timedelta(seconds=120)


def _refused(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.startswith("paddle-meter: error: "), proc.stderr
    assert message in proc.stderr, proc.stderr


def test_past_expiry_refused(cli):
    yesterday = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()
    _refused(cli.run("keys", "create", "--tenant", "acme", "--role", "caller", "--expires",
                     yesterday), "in the past")
    _refused(cli.run("keys", "create", "--tenant", "acme", "--role", "caller", "--expires",
                     "31/12/2099"), "YYYY-MM-DD")
    assert not cli.secret_file.exists()  # refused before anything was created
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    cli.ok("keys", "create", "--tenant", "acme", "--role", "caller", "--expires", today)
    assert len(cli.store().list()) == 1


def test_errors_exit_2(cli):
    _refused(cli.run("keys", "list"), "no server secret")  # nothing created yet
    _refused(cli.run("keys", "create", "--tenant", "acme", "--role", "boss"), "role must be")
    _refused(cli.run("keys", "create", "--tenant", "*", "--role", "caller"), "auditor")
    cli.ok("keys", "create", "--tenant", "acme", "--role", "caller")
    _refused(cli.run("keys", "revoke", "nosuchkey000"), "no API key with id 'nosuchkey000'")
    _refused(cli.run("keys", "rotate", "nosuchkey000"), "no API key with id 'nosuchkey000'")
    key_id = cli.store().list()[0].key_id
    _refused(cli.run("keys", "rotate", key_id, "--grace", "-5"), "grace must be")
    cli.ok("keys", "revoke", key_id)
    _refused(cli.run("keys", "rotate", key_id), "revoked")
    # another server secret than the keys were made with
    _refused(cli.run("keys", "list", env={SECRET_ENV: "z" * 40}),
             "every worker, replica and the CLI must use the same")
    _refused(cli.run("keys", "list", env={SECRET_ENV: "short"}), "at least 32 characters")
    cli.secret_file.chmod(0o644)
    _refused(cli.run("keys", "list"), f"chmod 600 {cli.secret_file}")


def test_ledger_option_and_password_redacted(cli, tmp_path):
    env = {SECRET_ENV: "q" * 40}
    other = tmp_path / "other.sqlite3"
    key = cli.run("keys", "create", "--tenant", "acme", "--role", "caller", "--ledger",
                  str(other), env=env)
    assert key.returncode == 0, key.stderr
    listed = cli.run("keys", "list", "--json", "--ledger", str(other), env=env)
    assert [k["id"] for k in json.loads(listed.stdout)["keys"]] == [split_key(key.stdout.strip())]
    proc = cli.run("keys", "list", "--ledger",
                   "postgresql://pm:hunter2secret@127.0.0.1:5432/pm_no_such_db", env=env)
    _refused(proc, "PostgreSQL")
    assert "hunter2secret" not in proc.stderr and "***" in proc.stderr
