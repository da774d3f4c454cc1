"""API keys for tests, made the way an operator makes them: the real ``paddle-meter keys``
CLI against a ServerProcess's own config (and so its ledger and server secret).

``auth_env()`` gives a fresh server secret in ``PADDLE_METER_AUTH_SECRET``: pass it both to
the ServerProcess and to these helpers, or let the server create ``data/auth.secret``
(0600) on first start and call the helpers after ``start()``; either way server and CLI
agree. ``create_expired_key`` writes through the real KeyStore (the CLI refuses a past
``--expires``, rightly), with the same secret the server uses.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["auth_env", "create_expired_key", "create_key", "keys_cli"]

_EXE = Path(sys.executable).with_name("paddle-meter")


def auth_env() -> dict[str, str]:
    """A new server secret in the environment variable the server and the CLI read."""
    return {"PADDLE_METER_AUTH_SECRET": secrets.token_hex(32)}


def keys_cli(server: Any, *args: str, env: Mapping[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """``paddle-meter keys ARGS`` with ``server``'s config (a ServerProcess, started)."""
    done = subprocess.run(
        [str(_EXE), "keys", *args],
        env={**os.environ, **(env or {}),
             "PADDLE_METER_CONFIG": str(Path(server.workdir) / "config.yaml")},
        cwd=server.workdir, capture_output=True, text=True, check=False, timeout=60,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"paddle-meter keys {' '.join(args)} exited {done.returncode}: "
                           f"{done.stderr.strip()}")
    return done


def create_key(server: Any, tenant: str, role: str, *, name: str | None = None,
               expires: str | None = None, env: Mapping[str, str] | None = None,
               ) -> tuple[str, str]:
    """(key id, key) of a new key made by ``paddle-meter keys create --json``."""
    args = ["create", "--tenant", tenant, "--role", role, "--json"]
    if name is not None:
        args += ["--name", name]
    if expires is not None:
        args += ["--expires", expires]
    document = json.loads(keys_cli(server, *args, env=env).stdout)
    return document["id"], document["key"]


def create_expired_key(server: Any, tenant: str, role: str, *,
                       env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(key id, key) of a key that expired on 2020-01-01, in ``server``'s key table."""
    import datetime as dt

    from auth.keys import KeyStore
    from auth.secret import SECRET_ENV, load_server_secret
    from serving.config import auth_secret_path, ledger_url, load_config

    config = load_config(str(Path(server.workdir) / "config.yaml"))
    secret_text = (env or {}).get(SECRET_ENV) or dict(getattr(server, "env", {})).get(SECRET_ENV)
    if secret_text:
        secret = secret_text.encode()
    else:
        secret = load_server_secret(auth_secret_path(config), create=False)
    store = KeyStore(ledger_url(config), secret)
    try:
        record, key = store.create(tenant=tenant, role=role, name="expired",
                                   expires=dt.date(2020, 1, 1), actor="tests")
    finally:
        store.close()
    return record.key_id, key
