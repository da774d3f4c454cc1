"""The UsageSink surface shared by every ledger writer, over a GroupCommitWriter.

A writer subclass supplies ``_commit(unique, repeats, count_replays) -> list[WriteOutcome]``
(one durable transaction, run on the writer thread; see group_commit.CommitFn) and
``_close()``; this class gives it ``submit`` (async), ``write_batch`` (blocking),
``force_flush``, ``shutdown``, ``stats``, ``health`` and ``can_accept``.

Records are validated and converted to their ledger row (``record_to_row``) on the
submitting side, once: a malformed record is rejected before it can poison a batch or
the spool, and the writer thread only binds ready tuples. A writer that stores records
rather than rows (JSONL) overrides ``_prepare`` and ``_view``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from exporters.ledger.base import LedgerHealth, WriteOutcome
from exporters.ledger.dsn import redact_dsn, scrub_error
from exporters.ledger.group_commit import CommitListener, GroupCommitWriter, LedgerStats
from exporters.ledger.outcomes import EntryView
from exporters.ledger.schema import billed_of_row, billing_key, record_to_row
from exporters.ledger.spool import Spool
from exporters.usage_record import UsageRecord

__all__ = ["GroupCommitSink"]


class GroupCommitSink:
    """Base of the SQLite, PostgreSQL and JSONL writers (implements UsageSink)."""

    url: str = ""  # never carries a password: redacted by the writer that sets it
    _secret_url: str | None = None  # the real DSN, for scrubbing echoes of its password
    _view = EntryView(key=billing_key, billed=billed_of_row)  # entries are row tuples

    def _start(
        self,
        *,
        name: str,
        spool_dir: str | None,
        max_batch: int,
        retry_interval_s: float,
        max_pending: int = 100_000,
    ) -> None:
        self._writer = GroupCommitWriter(
            self._commit,
            close=self._close,
            spool=Spool(spool_dir) if spool_dir else None,
            name=name,
            view=self._view,
            max_batch=max_batch,
            max_pending=max_pending,
            retry_interval_s=retry_interval_s,
            scrub=self._scrub,
        )
        self._submit_nowait = self._writer.submit_nowait

    @property
    def stats(self) -> LedgerStats:
        """Counters: committed, duplicates, spooled, replayed, failed, ... (see LedgerStats)."""
        return self._writer.stats

    def health(self) -> LedgerHealth:
        """Snapshot for metrics and readiness (spool_pending, write_failures, quarantined,
        conflicts, queue_depth, last_commit_latency_s, healthy, ...; see LedgerHealth).
        Never blocks."""
        return self._writer.health()

    def can_accept(self) -> bool:
        """False while a record could be neither committed nor spooled, while the writer
        queue is full (``max_pending``), or after shutdown."""
        return self._writer.can_accept()

    def add_commit_listener(self, listener: CommitListener) -> None:
        """``listener(seconds, records)`` after each successful commit, on the writer
        thread (for a commit-latency histogram); must be quick, must not block."""
        self._writer.add_commit_listener(listener)

    def _scrub(self, text: str) -> str:
        return scrub_error(text, self._secret_url) if self._secret_url else redact_dsn(text)

    async def submit(self, record: UsageRecord) -> WriteOutcome:
        """Return once ``record`` is durable. Raises LedgerWriteError (at once when the
        writer queue is full), ValueError (bad record)."""
        entry = self._prepare(record)
        return await self._submit_nowait(entry, asyncio.get_running_loop())

    def write_batch(self, records: Sequence[UsageRecord]) -> list[WriteOutcome]:
        """Blocking: make all ``records`` durable (one commit unless larger than max_batch)."""
        prepare = self._prepare
        return self._writer.enqueue([prepare(r) for r in records]).result()

    def write_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[WriteOutcome]:
        """Blocking bulk load of ready ledger rows (``record_to_row`` tuples, RAW_COLUMNS
        order): the same commit, rollups and idempotency as ``write_batch`` minus the
        per-record conversion. For loaders and benchmarks; SQL writers only."""
        return self._writer.enqueue(rows).result()

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted is durable (committed or spooled)."""
        return self._writer.flush(timeout_s)

    def shutdown(self) -> None:
        """Flush, retry the spool once, close; idempotent."""
        self._writer.close()

    def _prepare(self, record: UsageRecord) -> Any:
        """Validate ``record`` and return what the writer thread commits (its row tuple).

        Raises TypeError (not a UsageRecord) or ValueError (empty request_id, bad ts/cost).
        """
        if type(record) is not UsageRecord and not isinstance(record, UsageRecord):
            raise TypeError(f"expected UsageRecord, got {type(record).__name__}")
        if not record.request_id:
            raise ValueError("usage record has an empty request_id")
        return record_to_row(record)

    def _commit(
        self, unique: Sequence[Any], repeats: Sequence[Any], count_replays: bool
    ) -> list[WriteOutcome]:  # pragma: no cover
        raise NotImplementedError

    def _close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_dsn(self.url)!r})"

    __str__ = __repr__
