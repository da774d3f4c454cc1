"""Read access to a SQL ledger for reports, exports and repricing (never metered).

:func:`parse_ledger_url` is the one place that understands ledger locations:
a filesystem path or ``sqlite:///path`` (SQLite), ``postgresql://...`` (PostgreSQL),
``jsonl:///path`` (JSONL). :class:`LedgerReader` opens short-lived connections to a SQL
ledger; queries are written with ``?`` placeholders and adapted per dialect by :meth:`sql`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from exporters.ledger.dsn import redact_dsn

__all__ = ["LedgerReader", "parse_ledger_url"]


def parse_ledger_url(url_or_path: str) -> tuple[str, str]:
    """(kind, target): kind is sqlite / postgresql / jsonl. Raises ValueError."""
    if not url_or_path or not isinstance(url_or_path, str):
        raise ValueError("ledger location is empty")
    if url_or_path.startswith(("postgresql://", "postgres://")):
        return "postgresql", url_or_path
    for scheme in ("sqlite", "jsonl"):
        prefix = f"{scheme}://"
        if url_or_path.startswith(prefix):
            path = url_or_path[len(prefix) :]
            if not path.startswith("/"):
                raise ValueError(f"{scheme} URL needs an absolute path: {scheme}:///path")
            return scheme, "/" + path.lstrip("/")
    if "://" in url_or_path:
        raise ValueError(
            f"unknown ledger URL scheme in {redact_dsn(url_or_path)!r}; use a path, sqlite:///path, "
            "postgresql://... or jsonl:///path"
        )
    return "sqlite", os.path.abspath(url_or_path)


class LedgerReader:
    """Connections to an existing SQL ledger (migrated in place on first use)."""

    def __init__(self, url_or_path: str) -> None:
        kind, target = parse_ledger_url(url_or_path)
        if kind == "jsonl":
            raise ValueError(
                "reports, exports and repricing need a SQL ledger (SQLite or PostgreSQL); "
                f"{redact_dsn(url_or_path)!r} is a JSONL log"
            )
        if kind == "sqlite" and not os.path.exists(target):
            raise FileNotFoundError(f"no ledger database at {target}")
        self.dialect = kind
        self.target = target
        self._migrated = False

    def __repr__(self) -> str:
        return f"LedgerReader({redact_dsn(self.target)!r})"

    __str__ = __repr__

    def sql(self, text: str) -> str:
        """Adapt ``?`` placeholders to the dialect."""
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        """A DB-API connection in autocommit mode; closed on exit."""
        if self.dialect == "postgresql":
            from exporters.ledger.postgres import connect_postgres

            conn: Any = connect_postgres(self.target, create=not self._migrated)
        else:
            from exporters.ledger.sqlite import connect_sqlite

            if not self._migrated:
                connect_sqlite(self.target, create=True).close()
            conn = connect_sqlite(self.target, create=False)
        self._migrated = True
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one write transaction (BEGIN IMMEDIATE in SQLite)."""
        with self.connect() as conn:
            cur = conn.cursor()
            cur.execute("BEGIN" if self.dialect == "postgresql" else "BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def iter_rows(
        self, query: str, params: tuple[Any, ...] = (), *, chunk: int = 5000
    ) -> Iterator[tuple[Any, ...]]:
        """Stream a SELECT: server-side cursor in PostgreSQL, fetchmany in SQLite."""
        with self.connect() as conn:
            if self.dialect == "postgresql":
                with conn.transaction(), conn.cursor(name="ledger_stream") as cur:
                    cur.itersize = chunk
                    cur.execute(self.sql(query), params)
                    yield from cur
            else:
                cur = conn.execute(query, params)
                while True:
                    rows = cur.fetchmany(chunk)
                    if not rows:
                        break
                    yield from rows

    def fetch_all(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            cur = conn.cursor()
            cur.execute(self.sql(query), params)
            return cur.fetchall()
