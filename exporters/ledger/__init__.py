"""Durable bill ledger: one UsageSink interface, three writers, and ``open_ledger``.

Write policy (what happens when the database fails):
  * Each batch of records is committed in one transaction; ``submit`` returns only after
    COMMIT (fsync'd), so a request's record is durable before its response leaves.
  * If the database refuses the batch (down, locked past busy_timeout, disk full), the
    records are appended to a local spool file (JSONL, fsync'd, 0600 in a 0700 dir) and
    ``submit`` returns ``WriteOutcome(spooled=True)``: nothing served goes unbilled. The
    writer thread replays the spool every ``retry_interval_s``; replays are idempotent by
    billing key, so nothing is double-counted once the database is back. Spool files left
    by a dead process are replayed by the next writer that opens the same spool dir.
  * If even the spool write fails, ``submit`` raises LedgerWriteError: the request must
    fail rather than be served unbilled. Counted in ``sink.stats.failed``.
  * The billing key is per tenant (schema v4): at most one ok (billed) record per
    (tenant, request_id); each failed attempt is its own row (keyed by its span id), so a
    failed attempt never blocks billing the successful retry. A retried ok record is not
    stored again (``inserted=False``) and is told the billed record's figures
    (``existing``); when its payload hash matches, the replay is counted in
    ``request_replays`` in the same transaction (``replays``). Deciding whether to serve
    or refuse a replay is the metering policy's (interceptors/billing_policy.py).
  * A spooled ok record whose key was billed meanwhile with another payload is not
    written at replay: it goes to ``<spool_dir>/conflicts.jsonl`` (0600), is counted
    (``health().conflicts``) and logged at ERROR.
  * The writer queue is bounded (``max_pending`` records, default 100,000): beyond it
    ``submit`` raises LedgerWriteError at once and ``can_accept()`` is False until it
    drains (``health().queue_depth``).
  * One spool dir per data dir (``<data_dir>/ledger.spool``) whatever the ledger kind;
    a spool file is removed only after its records are committed, malformed lines go to
    a quarantine file (see exporters/ledger/spool.py). ``health()`` / ``can_accept()``
    report spool_pending, write_failures, quarantined, commit latency and readiness.
  * Secrets: DSN passwords are redacted (exporters/ledger/dsn.py) in every repr, log
    line, raised message and CLI output.
"""

from __future__ import annotations

import inspect
from typing import Any

from exporters.ledger.base import (
    BilledRecord,
    LedgerHealth,
    LedgerUnavailable,
    LedgerWriteError,
    ReportsHealth,
    UsageSink,
    WriteOutcome,
)
from exporters.ledger.dsn import redact_dsn
from exporters.ledger.group_commit import LedgerStats
from exporters.ledger.reader import LedgerReader, parse_ledger_url
from exporters.ledger.spool import SPOOL_DIR_NAME

__all__ = [
    "SPOOL_DIR_NAME",
    "BilledRecord",
    "LedgerHealth",
    "LedgerReader",
    "LedgerStats",
    "LedgerUnavailable",
    "LedgerWriteError",
    "ReportsHealth",
    "UsageSink",
    "WriteOutcome",
    "open_ledger",
    "parse_ledger_url",
    "redact_dsn",
]


def open_ledger(url_or_path: str, **opts: Any) -> UsageSink:
    """Open a ledger writer (creating/migrating the database) from a path or URL.

    A path or ``sqlite:///path`` -> SqliteLedger, ``postgresql://...`` -> PostgresLedger,
    ``jsonl:///path`` -> JsonlLedger. ``opts`` are the writer's keyword options
    (``spool_dir``, ``max_batch``, ``max_pending``, ``retry_interval_s``, ...); unknown keys
    raise ValueError.
    ``spool_dir`` is honoured by both SQL kinds (a server passes ``<data_dir>/ledger.spool``
    whatever the URL); the JSONL writer has no spool and ignores it. Blocks while
    connecting and migrating; a PostgreSQL failure raises LedgerUnavailable (scrubbed).
    """
    kind, target = parse_ledger_url(url_or_path)
    if kind == "postgresql":
        from exporters.ledger.postgres import PostgresLedger as cls
    elif kind == "jsonl":
        from exporters.ledger.jsonl import JsonlLedger as cls
    else:
        from exporters.ledger.sqlite import SqliteLedger as cls
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self",)][1:]
    if kind == "jsonl":
        opts.pop("spool_dir", None)  # the JSONL file is itself the local durable copy
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {kind} ledger option(s) {unknown}; allowed: {allowed}")
    return cls(target, **opts)
