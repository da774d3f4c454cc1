"""Group commit: one writer thread turns concurrent submits into one durable transaction.

Every writer (SQLite, PostgreSQL, JSONL) owns a :class:`GroupCommitWriter`. Submitters
enqueue records and wait on a future; the thread takes everything queued (up to
``max_batch`` records), deduplicates request_ids within the batch, calls the writer's
``commit`` function once (one transaction, one fsync), then resolves every future. So the
cost of an fsync is shared by all requests that finished while the previous one ran.

When ``commit`` raises and a :class:`Spool` is configured, the batch is appended to the
spool (fsync'd) and reported durable with ``spooled=True``; the thread replays the spool
into the database every ``retry_interval_s`` until it succeeds. Only when even the spool
write fails do the submitters get :class:`LedgerWriteError`. All counters are in ``stats``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

from exporters.ledger.base import LedgerWriteError, WriteOutcome
from exporters.ledger.spool import Spool
from exporters.usage_record import UsageRecord

__all__ = ["CommitFn", "GroupCommitWriter", "LedgerStats"]

_log = logging.getLogger(__name__)

CommitFn = Callable[[Sequence[UsageRecord]], list[bool]]
"""Write unique-request_id records in one durable transaction; True where newly inserted."""


@dataclasses.dataclass
class LedgerStats:
    """Counters of one ledger writer (read them from any thread; the writer thread updates)."""

    committed: int = 0  # records newly written to the database
    duplicates: int = 0  # request_ids already present (retries), not written again
    spooled: int = 0  # records that went to the local spool because the database failed
    replayed: int = 0  # spooled records later committed to the database
    failed: int = 0  # records that could not be made durable anywhere (LedgerWriteError)
    batches: int = 0  # database transactions attempted for new records
    db_errors: int = 0  # failed database transactions
    spool_pending: int = 0  # records in the spool awaiting replay

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Item:
    records: Sequence[UsageRecord]
    future: concurrent.futures.Future[list[WriteOutcome]]


_STOP = object()


class GroupCommitWriter:
    """Owns the queue and the writer thread; ``commit`` and ``close`` run on that thread."""

    def __init__(
        self,
        commit: CommitFn,
        *,
        close: Callable[[], None],
        spool: Spool | None,
        name: str,
        max_batch: int = 10_000,
        retry_interval_s: float = 1.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._commit = commit
        self._close = close
        self._spool = spool
        self._max_batch = max_batch
        self._retry_interval_s = retry_interval_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._last_failure = 0.0
        self.stats = LedgerStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._pid = os.getpid()
        self._thread.start()

    def enqueue(self, records: Sequence[UsageRecord]) -> concurrent.futures.Future:
        """Queue records; the future resolves to one WriteOutcome each, or LedgerWriteError."""
        future: concurrent.futures.Future[list[WriteOutcome]] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                future.set_exception(LedgerWriteError("ledger is shut down"))
                return future
            if os.getpid() != self._pid:
                # Threads do not survive fork: a forked worker must open its own ledger.
                future.set_exception(LedgerWriteError("ledger opened before fork; reopen it"))
                return future
            self._queue.put(_Item(records, future))
        return future

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block until everything queued before this call is durable; False on timeout."""
        try:
            self.enqueue(()).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            return False
        except LedgerWriteError:
            return True  # already shut down, which flushed
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush, stop the thread and close the connection; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout_s)

    # -- writer thread -------------------------------------------------------------

    def _run(self) -> None:
        self._replay_orphans()
        stop = False
        while not stop:
            waiting = self._spool is not None and self._spool.pending
            try:
                first = self._queue.get(timeout=self._retry_interval_s if waiting else None)
            except queue.Empty:
                self._replay()
                continue
            items: list[_Item] = []
            count = 0
            nxt: object = first
            while True:
                if nxt is _STOP:
                    stop = True
                    break
                assert isinstance(nxt, _Item)
                items.append(nxt)
                count += len(nxt.records)
                if count >= self._max_batch:
                    break
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._process(items)
        self._replay()
        try:
            self._close()
        except Exception:  # closing must not raise out of shutdown
            _log.exception("closing ledger connection failed")
        if self._spool is not None:
            self._spool.close()

    def _process(self, items: list[_Item]) -> None:
        records: list[UsageRecord] = []
        first_index: dict[str, int] = {}
        for item in items:
            for rec in item.records:
                first_index.setdefault(rec.request_id, len(records))
                records.append(rec)
        unique = [records[i] for i in sorted(set(first_index.values()))]
        outcomes: list[WriteOutcome]
        if not unique:
            outcomes = []
        else:
            if self._spool is not None and self._spool.pending:
                self._replay()
            try:
                # While the database is known to be down, go straight to the spool so
                # requests are not held up by a connection timeout per batch.
                if self._spool is not None and self._spool.pending and (
                    time.monotonic() - self._last_failure < self._retry_interval_s
                ):
                    raise _SkipDatabase()
                self.stats.batches += 1
                flags = self._commit(unique)
                inserted = dict(zip((r.request_id for r in unique), flags, strict=True))
                self.stats.committed += sum(flags)
                self.stats.duplicates += len(records) - sum(flags)
                outcomes = [
                    WriteOutcome(inserted[r.request_id] and first_index[r.request_id] == i)
                    for i, r in enumerate(records)
                ]
            except Exception as exc:
                if not isinstance(exc, _SkipDatabase):
                    self.stats.db_errors += 1
                    self._last_failure = time.monotonic()
                    _log.warning("ledger commit failed (%s); spooling %d records", exc, len(unique))
                outcomes = self._spool_or_fail(unique, records, first_index, exc)
                if outcomes is None:
                    for item in items:
                        _resolve(item.future, error=LedgerWriteError(
                            f"usage record not durable: {exc!r}"))
                    return
        pos = 0
        for item in items:
            n = len(item.records)
            _resolve(item.future, outcomes[pos:pos + n])
            pos += n

    def _spool_or_fail(self, unique, records, first_index, exc) -> list[WriteOutcome] | None:
        if self._spool is None:
            self.stats.failed += len(unique)
            return None
        try:
            self._spool.append(unique)
        except OSError as spool_exc:
            self.stats.failed += len(unique)
            _log.error("ledger spool write failed too (%s); %d records not durable",
                       spool_exc, len(unique))
            return None
        self.stats.spooled += len(unique)
        self.stats.spool_pending = self._spool.pending
        self.stats.duplicates += len(records) - len(unique)
        return [
            WriteOutcome(first_index[r.request_id] == i, spooled=True)
            for i, r in enumerate(records)
        ]

    def _commit_chunks(self, records: Sequence[UsageRecord]) -> None:
        for start in range(0, len(records), self._max_batch):
            self._commit(records[start:start + self._max_batch])

    def _replay(self) -> None:
        """Try to move this process's spool into the database (idempotent)."""
        self._replay_orphans()
        spool = self._spool
        if spool is None or not spool.pending:
            return
        try:
            records = spool.read_own()
            self._commit_chunks(records)
        except Exception as exc:
            self._last_failure = time.monotonic()
            _log.debug("spool replay failed: %s", exc)
            return
        spool.clear_own()
        self.stats.replayed += len(records)
        self.stats.spool_pending = 0
        _log.info("replayed %d spooled usage records into the ledger", len(records))

    def _replay_orphans(self) -> None:
        """Replay spool files left by processes that died before replaying them."""
        if self._spool is None:
            return
        try:
            for path, fd in self._spool.orphans():
                try:
                    records = Spool.read_path(path)
                    self._commit_chunks(records)
                    os.unlink(path)
                    self.stats.replayed += len(records)
                finally:
                    os.close(fd)
        except Exception as exc:
            _log.debug("orphan spool replay failed: %s", exc)


class _SkipDatabase(Exception):
    pass


def _resolve(future: concurrent.futures.Future, result: object = None,
             error: BaseException | None = None) -> None:
    """Settle a submitter's future; a submitter that gave up (cancelled) is ignored, but
    its record was written all the same: once enqueued, a record is never dropped."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
