"""A throwaway PostgreSQL database on the machine's real server, for ledger tests.

This machine kind runs PostgreSQL on 127.0.0.1:5432 (trust auth); `.ci/run` starts it where
it is down. Without CI set, a missing server skips the test; under CI it fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest

__all__ = ["admin_connection", "cluster_ctl", "ensure_cluster_up", "temporary_database"]


def admin_connection() -> psycopg.Connection:
    last: Exception | None = None
    for url in (
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgresql://127.0.0.1:5432/postgres",
    ):
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError as exc:
            last = exc
    if os.environ.get("CI"):
        raise RuntimeError(f"PostgreSQL not reachable on 127.0.0.1:5432 under CI: {last}")
    pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {last}")
    raise AssertionError("unreachable")


@contextlib.contextmanager
def temporary_database(prefix: str = "pm_test") -> Iterator[str]:
    """Create a fresh database, yield its URL, drop it afterwards."""
    admin = admin_connection()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    user = admin.info.user
    admin.close()
    try:
        yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    finally:
        # A new session: the test may have restarted the server, cutting the first one.
        admin = admin_connection()
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        admin.execute(f'DROP DATABASE "{name}"')
        admin.close()


def _cluster() -> tuple[str, str, str]:
    """(version, name, status) of the cluster on port 5432, from ``pg_lsclusters``."""
    out = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "5432":
            return fields[0], fields[1], fields[3]
    raise RuntimeError(f"no PostgreSQL cluster on port 5432 in pg_lsclusters:\n{out}")


def cluster_ctl(action: str) -> None:
    """``pg_ctlcluster VERSION NAME ACTION`` (start, stop, restart) on this machine's server.

    Stops are ``fast`` (pg_ctlcluster's default): open sessions are cut off, as a crash or
    a failover would cut off the server's ledger connections. Needs root or the cluster's
    owner; without ``pg_lsclusters`` (another machine kind) the test is skipped.
    """
    try:
        version, name, _ = _cluster()
    except FileNotFoundError:
        pytest.skip("pg_lsclusters not found: PostgreSQL is not managed here")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action],
        check=True, capture_output=True, timeout=120,
    )


def ensure_cluster_up() -> None:
    """Start the cluster unless it is online (a test that stopped it must leave it running)."""
    if _cluster()[2] != "online":
        cluster_ctl("start")
