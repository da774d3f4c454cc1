"""The interface between the metering core and a durable ledger writer.

The metering core calls :meth:`UsageSink.submit` once per finished request, before the
response leaves; it returns only when the record is durable (or safely spooled), and
raises :class:`LedgerWriteError` when it could not be made durable. Writers: SQLite (the
embedded default), PostgreSQL, JSONL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from exporters.usage_record import UsageRecord

__all__ = [
    "BilledRecord",
    "LedgerHealth",
    "LedgerUnavailable",
    "LedgerWriteError",
    "ReportsHealth",
    "UsageSink",
    "WriteOutcome",
]


class LedgerWriteError(Exception):
    """The record could not be made durable; the caller must not report it as written."""


class LedgerUnavailable(Exception):
    """The ledger database cannot be reached or opened; the message holds no password.

    Raised by opening a ledger or a reader (PostgreSQL: also a psycopg.OperationalError).
    """


@dataclasses.dataclass(frozen=True)
class BilledRecord:
    """The figures of the ok (billed) record already in the ledger for a (tenant, request_id)."""

    content_sha256: str | None
    input_tokens: int
    output_tokens: int
    billable_tokens: int
    price_id: str | None
    cost: str | None


class WriteOutcome:
    """Result of a durable write.

    ``inserted`` False: a record with the same billing key is already in the ledger (or
    earlier in the same batch): for an ok record that is the ok record of the same
    (tenant, request_id); for a failed attempt, the same attempt (same span id).
    ``existing``: for a not-inserted ok record, the figures of the ok record already
    billed (None otherwise). ``replays``: when ``existing.content_sha256`` equals the
    record's, the writer counted the replay in ``request_replays`` in the same
    transaction and this is the count after it (1 for the first replay); 0 otherwise.
    ``spooled`` True: the database was unavailable and the record is durable in the local
    spool, to be replayed later (``inserted`` is then provisional and ``existing``
    unknown; a replayed ok record whose key exists with another payload goes to the
    spool's conflicts file).
    """

    __slots__ = ("existing", "inserted", "replays", "spooled")

    def __init__(
        self,
        inserted: bool,
        spooled: bool = False,
        existing: BilledRecord | None = None,
        replays: int = 0,
    ) -> None:
        self.inserted = inserted
        self.spooled = spooled
        self.existing = existing
        self.replays = replays

    def __repr__(self) -> str:
        return (
            f"WriteOutcome(inserted={self.inserted}, spooled={self.spooled}, "
            f"existing={self.existing!r}, replays={self.replays})"
        )


@runtime_checkable
class UsageSink(Protocol):
    async def submit(self, record: UsageRecord) -> WriteOutcome:
        """Make ``record`` durable; await from the event loop. Raises LedgerWriteError."""
        ...

    def write_batch(self, records: Sequence[UsageRecord]) -> list[WriteOutcome]:
        """Blocking variant for tools and benchmarks: one durable commit for all records."""
        ...

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted is durable; False on timeout."""
        ...

    def shutdown(self) -> None:
        """Flush and close; idempotent."""
        ...


@dataclasses.dataclass(frozen=True)
class LedgerHealth:
    """A snapshot of a ledger writer's health, for metrics and readiness (cheap, no I/O).

    ``healthy`` is False while a new record would be refused: it could be neither
    committed nor spooled (the last database attempt failed and so did the last spool
    write or probe), the writer queue is full (``queue_depth`` >= ``max_pending``), or
    the writer is shut down; requests would then fail with LedgerWriteError, so a server
    should report itself not ready. The writer keeps retrying both every
    ``retry_interval_s`` on its own, so ``healthy`` comes back without traffic.
    """

    healthy: bool
    database_ok: bool  # the last commit / replay / probe against the database succeeded
    spool_ok: bool  # a spool is configured and its last write or probe succeeded
    spool_pending: int  # records in this spool dir (own file + dead processes') not yet committed
    write_failures: int  # records that could not be made durable anywhere (LedgerWriteError)
    db_errors: int  # failed database transactions (their records were spooled or failed)
    quarantined: int  # malformed spool lines this writer moved to the quarantine file
    torn_lines: int  # unterminated last lines of crashed writes, dropped (never acknowledged)
    last_commit_latency_s: float | None  # duration of the last successful commit, None before one
    spool_dir: str | None
    conflicts: int = 0  # spooled ok records whose (tenant, request_id) was billed with another payload
    queue_depth: int = 0  # records submitted and not yet settled (committed, spooled or failed)


@runtime_checkable
class ReportsHealth(Protocol):
    """Implemented by the SQLite, PostgreSQL and JSONL writers (not required of a UsageSink)."""

    def health(self) -> LedgerHealth:
        """Snapshot; never blocks on the database."""
        ...

    def can_accept(self) -> bool:
        """``health().healthy``."""
        ...
