"""A throwaway PostgreSQL database on the machine's real server, for ledger tests.

This machine kind runs PostgreSQL on 127.0.0.1:5432 (trust auth); `.ci/run` starts it where
it is down. Without CI set, a missing server skips the test; under CI it fails.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

__all__ = ["admin_connection", "temporary_database"]


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
    try:
        yield f"postgresql://{admin.info.user}@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        admin.execute(f'DROP DATABASE "{name}"')
        admin.close()
