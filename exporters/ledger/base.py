"""The interface between the metering core and a durable ledger writer.

The metering core calls :meth:`UsageSink.submit` once per finished request, before the
response leaves; it returns only when the record is durable (or safely spooled), and
raises :class:`LedgerWriteError` when it could not be made durable. Writers: SQLite (the
embedded default), PostgreSQL, JSONL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from exporters.usage_record import UsageRecord

__all__ = ["LedgerWriteError", "UsageSink", "WriteOutcome"]


class LedgerWriteError(Exception):
    """The record could not be made durable; the caller must not report it as written."""


class WriteOutcome:
    """Result of a durable write: ``inserted`` False means the request_id was already billed.

    ``spooled`` True: the database was unavailable and the record is durable in the local
    spool, to be replayed later (``inserted`` is then provisional: the replay is idempotent).
    """

    __slots__ = ("inserted", "spooled")

    def __init__(self, inserted: bool, spooled: bool = False) -> None:
        self.inserted = inserted
        self.spooled = spooled

    def __repr__(self) -> str:
        return f"WriteOutcome(inserted={self.inserted}, spooled={self.spooled})"


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
