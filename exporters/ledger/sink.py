"""The UsageSink surface shared by every ledger writer, over a GroupCommitWriter.

A writer subclass supplies ``_commit(records) -> list[bool]`` (one durable transaction,
run on the writer thread) and ``_close()``; this class gives it ``submit`` (async),
``write_batch`` (blocking), ``force_flush``, ``shutdown`` and ``stats``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from exporters.ledger.base import WriteOutcome
from exporters.ledger.group_commit import GroupCommitWriter, LedgerStats
from exporters.ledger.schema import cost_to_micros, normalize_ts
from exporters.ledger.spool import Spool
from exporters.usage_record import UsageRecord

__all__ = ["GroupCommitSink"]


class GroupCommitSink:
    """Base of the SQLite, PostgreSQL and JSONL writers (implements UsageSink)."""

    url: str = ""

    def _start(
        self, *, name: str, spool_dir: str | None, max_batch: int, retry_interval_s: float
    ) -> None:
        self._writer = GroupCommitWriter(
            self._commit,
            close=self._close,
            spool=Spool(spool_dir) if spool_dir else None,
            name=name,
            max_batch=max_batch,
            retry_interval_s=retry_interval_s,
        )

    @property
    def stats(self) -> LedgerStats:
        """Counters: committed, duplicates, spooled, replayed, failed, ... (see LedgerStats)."""
        return self._writer.stats

    async def submit(self, record: UsageRecord) -> WriteOutcome:
        """Return once ``record`` is durable. Raises LedgerWriteError, ValueError (bad record)."""
        _validate(record)
        outcomes = await asyncio.wrap_future(self._writer.enqueue((record,)))
        return outcomes[0]

    def write_batch(self, records: Sequence[UsageRecord]) -> list[WriteOutcome]:
        """Blocking: make all ``records`` durable (one commit unless larger than max_batch)."""
        for record in records:
            _validate(record)
        return self._writer.enqueue(list(records)).result()

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted is durable (committed or spooled)."""
        return self._writer.flush(timeout_s)

    def shutdown(self) -> None:
        """Flush, retry the spool once, close; idempotent."""
        self._writer.close()

    def _commit(self, records: Sequence[UsageRecord]) -> list[bool]:  # pragma: no cover
        raise NotImplementedError

    def _close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _validate(record: UsageRecord) -> None:
    """Reject a malformed record at submit time, so it can never poison a batch or spool."""
    if not isinstance(record, UsageRecord):
        raise TypeError(f"expected UsageRecord, got {type(record).__name__}")
    if not record.request_id:
        raise ValueError("usage record has an empty request_id")
    normalize_ts(record.ts)
    cost_to_micros(record.cost)
