"""Group commit: one writer thread turns concurrent submits into one durable transaction.

Every writer (SQLite, PostgreSQL, JSONL) owns a :class:`GroupCommitWriter`. Submitters
enqueue *prepared* entries (row tuples for the SQL writers, already validated on the
submitting side) and wait on a future; the thread takes everything queued (up to
``max_batch`` entries), splits off later entries of a billing key already in the batch
(``(tenant, request_id, attempt)``, see exporters/ledger/schema.py), calls the writer's
``commit`` function once (one transaction, one fsync; it also settles those repeats,
exporters/ledger/outcomes.py), then settles every future. So the cost of an fsync is
shared by all requests that finished while the previous one ran.

The queue is bounded: at most ``max_pending`` records submitted and not yet settled;
beyond that a submit is refused at once with LedgerWriteError ("ledger writer queue
full") and ``health().healthy`` is False until it drains (memory stays bounded when the
database is slower than the traffic).

Per-record overhead is what limits throughput once fsyncs are shared, so the hot path is
kept lean: an ``asyncio`` submitter waits on a plain loop future, and the thread settles
all of one loop's futures with a single ``call_soon_threadsafe`` per batch (not one
cross-thread wake-up per record); blocking callers (``write_batch``, ``flush``) wait on a
``concurrent.futures.Future``.

When ``commit`` raises and a :class:`Spool` is configured, the batch is appended to the
spool (fsync'd) and reported durable with ``spooled=True``; the thread replays the spool
(its own file, and files left by dead processes) into the database every
``retry_interval_s`` until it succeeds. Only when even the spool write fails do the
submitters get :class:`LedgerWriteError`. All counters are in ``stats``; ``health()``
is the snapshot that metrics and readiness read. Failures are logged at WARNING/ERROR
(a streak of identical replay failures once per ``_LOG_EVERY_S``), with every message
passed through the writer's ``scrub`` so a DSN password never reaches a log line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from exporters.ledger.base import LedgerHealth, LedgerWriteError, WriteOutcome
from exporters.ledger.dsn import redact_dsn
from exporters.ledger.outcomes import EntryView, conflicting, split_repeats
from exporters.ledger.replay import SpoolReplay
from exporters.ledger.spool import Spool

__all__ = ["CommitFn", "CommitListener", "GroupCommitWriter", "LedgerStats"]

_log = logging.getLogger(__name__)

CommitFn = Callable[[Sequence[Any], Sequence[Any], bool], list[WriteOutcome]]
"""``commit(unique, repeats, count_replays)``: write ``unique`` (distinct billing keys) in
one durable transaction and return the outcomes of ``unique`` then of ``repeats`` (later
entries of keys in ``unique``, never written); ``count_replays`` False (spool replay):
request_replays is not touched. See exporters/ledger/outcomes.py."""

CommitListener = Callable[[float, int], None]
"""Called on the writer thread after each successful commit with (seconds, records)."""

_ORPHAN_SCAN_S = 30.0  # how often an idle writer looks for spools of dead processes

# Bumped in a forked child: the writer thread does not survive fork, so a writer opened
# before the fork must refuse work there (cheaper than an os.getpid() call per submit).
_fork_generation = 0


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


@dataclasses.dataclass
class LedgerStats:
    """Counters of one ledger writer (read them from any thread; the writer thread updates)."""

    committed: int = 0  # records newly written to the database
    duplicates: int = 0  # billing keys already present (retries), not written again
    replays: int = 0  # same-payload repeats of a billed (tenant, request_id), counted
    spooled: int = 0  # records that went to the local spool because the database failed
    replayed: int = 0  # spooled records later committed to the database
    failed: int = 0  # records that could not be made durable anywhere (LedgerWriteError)
    batches: int = 0  # database transactions attempted for new records
    db_errors: int = 0  # failed database transactions
    spool_pending: int = 0  # records in the spool dir awaiting replay (own + dead processes')
    quarantined: int = 0  # malformed spool lines moved to the quarantine file
    torn_lines: int = 0  # unterminated last lines of crashed spool writes, dropped
    replay_errors: int = 0  # failed replay attempts (the spool is kept and retried)
    conflicts: int = 0  # spooled ok records billed meanwhile with another payload (set aside)
    refused: int = 0  # submits refused because the writer queue was full

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# A queued item is a tuple (entries, future, loop): ``loop`` is the submitter's event loop
# when ``future`` is an asyncio future, None for a concurrent.futures.Future.
_Item = tuple[Sequence[Any], Any, "asyncio.AbstractEventLoop | None"]
_STOP = object()


class GroupCommitWriter(SpoolReplay):
    """Owns the queue and the writer thread; ``commit`` and ``close`` run on that thread.

    ``view`` reads an entry's billing key and figures; spooled entries are the SQL
    writers' row tuples as-is. ``scrub(text)`` cleans any text (error messages,
    tracebacks) before it is logged or raised; the default removes DSN passwords.
    """

    def __init__(
        self,
        commit: CommitFn,
        *,
        close: Callable[[], None],
        spool: Spool | None,
        name: str,
        view: EntryView,
        max_batch: int = 10_000,
        max_pending: int = 100_000,
        retry_interval_s: float = 1.0,
        scrub: Callable[[str], str] = redact_dsn,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self._commit = commit
        self._close = close
        self._spool = spool
        self._view = view
        self._key = view.key
        self._max_pending = max_pending
        self._pending = 0  # records queued and not yet settled; guarded by _lock
        self._scrub = scrub
        self._max_batch = max_batch
        self._retry_interval_s = retry_interval_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._last_failure = 0.0
        self._db_ok = True  # the writer connected at open
        self._spool_ok = spool is not None
        self._orphan_pending: dict[str, int] = {}
        self._last_commit_s: float | None = None
        self._listeners: list[CommitListener] = []
        self._warned_at = 0.0  # monotonic time of the last replay-failure warning
        self.stats = LedgerStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._generation = _fork_generation
        self._thread.start()

    # -- any thread ----------------------------------------------------------------

    def can_accept(self) -> bool:
        """``health().healthy`` without building the snapshot: asked once per model call."""
        return (
            not self._closed
            and self._generation == _fork_generation
            and (self._db_ok or self._spool_ok)
            and self._pending < self._max_pending
        )

    def health(self) -> LedgerHealth:
        """Snapshot for metrics and readiness; see :class:`LedgerHealth`. Never blocks."""
        s = self.stats
        depth = self._pending
        return LedgerHealth(
            healthy=self.can_accept(),
            database_ok=self._db_ok,
            spool_ok=self._spool_ok,
            spool_pending=s.spool_pending,
            write_failures=s.failed,
            db_errors=s.db_errors,
            quarantined=s.quarantined,
            torn_lines=s.torn_lines,
            last_commit_latency_s=self._last_commit_s,
            spool_dir=self._spool.directory if self._spool is not None else None,
            conflicts=s.conflicts,
            queue_depth=depth,
        )

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener(seconds, records)`` after each successful commit, on the writer
        thread: it must be quick; an exception from it is logged and ignored."""
        self._listeners.append(listener)

    def submit_nowait(self, entry: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """Queue one entry from ``loop``'s thread; the loop future gets its WriteOutcome."""
        future = loop.create_future()
        with self._lock:  # so nothing is queued behind _STOP
            if (
                self._closed
                or self._generation != _fork_generation
                or self._pending >= self._max_pending
            ):
                future.set_exception(self._refusal())
                return future
            self._pending += 1
            self._queue.put(((entry,), future, loop))
        return future

    def enqueue(self, entries: Sequence[Any]) -> concurrent.futures.Future:
        """Queue entries; the future resolves to one WriteOutcome each, or LedgerWriteError."""
        future: concurrent.futures.Future[list[WriteOutcome]] = concurrent.futures.Future()
        with self._lock:
            # An empty enqueue (flush) is never refused; a batch is taken whole when the
            # queue is below the bound, so one bulk load larger than it still goes in.
            if (
                self._closed
                or self._generation != _fork_generation
                or (entries and self._pending >= self._max_pending)
            ):
                future.set_exception(self._refusal())
                return future
            self._pending += len(entries)
            self._queue.put((entries, future, None))
        return future

    def _refusal(self) -> LedgerWriteError:
        if self._generation != _fork_generation:
            return LedgerWriteError("ledger opened before fork; reopen it")
        if self._closed:
            return LedgerWriteError("ledger is shut down")
        self.stats.refused += 1  # under _lock
        return LedgerWriteError("ledger writer queue full")

    def _settled(self, count: int) -> None:
        with self._lock:
            self._pending -= count

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

    def _degraded(self) -> bool:
        """Records waiting in the spool, or the database or the spool last failed."""
        return (
            bool(self.stats.spool_pending)
            or not self._db_ok
            or (self._spool is not None and not self._spool_ok)
        )

    def _run(self) -> None:
        self._replay(force=True)
        stop = False
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while not stop:
            degraded = self._degraded()
            wait = (
                self._retry_interval_s
                if degraded
                else (_ORPHAN_SCAN_S if self._spool is not None else None)
            )
            try:
                first = get(timeout=wait)
            except queue.Empty:
                self._replay(force=not degraded)
                if self._degraded():
                    self._probe()
                continue
            items: list[_Item] = []
            count = 0
            nxt: object = first
            while True:
                if nxt is _STOP:
                    stop = True
                    break
                items.append(nxt)  # type: ignore[arg-type]
                count += len(nxt[0])  # type: ignore[index]
                if count >= self._max_batch:
                    break
                try:
                    nxt = get_nowait()
                except queue.Empty:
                    break
            try:
                outcomes, error = self._process(items)
            except BaseException as exc:  # never leave a submitter waiting forever
                _log.error(
                    "ledger writer failed: %s",
                    self._scrub("".join(traceback.format_exception(exc))),
                )
                outcomes = None
                error = LedgerWriteError(f"usage record not durable: {self._describe(exc)}")
            # Free the queue slots before any submitter learns its outcome, so a caller
            # that saw its record settle never finds the queue still counting it.
            self._settled(count)
            _settle(items, outcomes, error)
        self._replay(force=True)
        try:
            self._close()
        except Exception as exc:  # closing must not raise out of shutdown
            _log.error("closing ledger connection failed: %s", self._describe(exc))
        if self._spool is not None:
            self._spool.close()
            if self.stats.spool_pending:
                _log.warning(
                    "ledger shut down with %d usage records still in the spool "
                    "%s; the next writer on this spool dir replays them",
                    self.stats.spool_pending,
                    self._spool.directory,
                )

    def _describe(self, exc: BaseException) -> str:
        return self._scrub(f"{type(exc).__name__}: {exc}")

    def _process(
        self, items: list[_Item]
    ) -> tuple[list[WriteOutcome] | None, LedgerWriteError | None]:
        """Commit (or spool) one batch; (outcomes in entry order, None) or (None, error)."""
        entries = [e for item in items for e in item[0]]
        if not entries:
            return [], None
        unique, repeats, order = split_repeats(entries, self._key)
        if self.stats.spool_pending:
            self._replay()
        try:
            # While the database is known to be down, go straight to the spool so
            # requests are not held up by a connection timeout per batch.
            if (
                self._spool is not None
                and not self._db_ok
                and (time.monotonic() - self._last_failure < self._retry_interval_s)
            ):
                raise _SkipDatabase()
            self.stats.batches += 1
            outcomes = self._timed_commit(unique, repeats, True)
        except Exception as exc:
            if not isinstance(exc, _SkipDatabase):
                self._db_failed()
                _log.warning(
                    "ledger commit failed (%s); spooling %d records",
                    self._describe(exc),
                    len(unique),
                )
            outcomes = self._spool_or_fail(unique, repeats)
            if outcomes is None:
                return None, LedgerWriteError(f"usage record not durable: {self._describe(exc)}")
            return (outcomes if order is None else [outcomes[i] for i in order]), None
        new = sum(o.inserted for o in outcomes)  # repeats are never inserted
        self.stats.committed += new
        if new != len(entries):
            self.stats.duplicates += len(entries) - new
            self.stats.replays += sum(1 for o in outcomes if o.replays)
        return (outcomes if order is None else [outcomes[i] for i in order]), None

    def _timed_commit(
        self, unique: Sequence[Any], repeats: Sequence[Any] = (), count_replays: bool = True
    ) -> list[WriteOutcome]:
        t0 = time.perf_counter()
        outcomes = self._commit(unique, repeats, count_replays)
        elapsed = time.perf_counter() - t0
        self._db_ok = True
        if unique:
            self._last_commit_s = elapsed
            for listener in self._listeners:
                try:
                    listener(elapsed, len(unique))
                except Exception:
                    _log.exception("ledger commit listener failed")
        return outcomes

    def _db_failed(self) -> None:
        self.stats.db_errors += 1
        self._db_ok = False
        self._last_failure = time.monotonic()

    def _spool_or_fail(
        self, unique: Sequence[Any], repeats: Sequence[Any]
    ) -> list[WriteOutcome] | None:
        """Spool ``unique``; outcomes for ``unique`` then ``repeats``, None if not durable.

        A repeat is not spooled (its key is): an ok repeat is told the figures of the
        batch's first record of its key (``existing``, replays not counted: the
        database is down), a failed attempt's repeat is a plain dedupe.
        """
        if self._spool is None:
            self.stats.failed += len(unique) + len(repeats)
            return None
        try:
            self._spool.append(unique)
        except OSError as spool_exc:
            self._spool_ok = False
            self.stats.failed += len(unique) + len(repeats)
            _log.error(
                "ledger spool write failed too (%s); %d records not durable",
                self._describe(spool_exc),
                len(unique),
            )
            return None
        self._spool_ok = True
        self.stats.spooled += len(unique)
        self._count_pending()
        self.stats.duplicates += len(repeats)
        outcomes = [WriteOutcome(True, spooled=True) for _ in unique]
        if repeats:
            key, billed = self._key, self._view.billed
            first = {key(e): e for e in unique}
            for entry in repeats:
                k = key(entry)
                outcomes.append(
                    WriteOutcome(
                        False, spooled=True, existing=billed(first[k]) if k[2] == "" else None
                    )
                )
        return outcomes

    def _probe(self) -> None:
        """While degraded and idle: check the database and the spool so that health
        recovers without traffic (a not-ready server gets none)."""
        if not self._db_ok and time.monotonic() - self._last_failure >= self._retry_interval_s:
            try:
                self._timed_commit((), (), False)
                _log.warning("ledger database reachable again")
            except Exception:
                self._last_failure = time.monotonic()
        if self._spool is not None and not self._spool_ok:
            try:
                self._spool.probe()
                self._spool_ok = True
                _log.warning("ledger spool %s writable again", self._spool.directory)
            except OSError:
                pass

    def _count_pending(self) -> None:
        own = self._spool.pending if self._spool is not None else 0
        self.stats.spool_pending = own + sum(self._orphan_pending.values())

    def _commit_chunks(self, entries: Sequence[Any]) -> list[tuple[Any, Any]]:
        """Commit spooled entries (replay: no replay counting); returns the conflicts:
        (entry, BilledRecord) of ok entries whose (tenant, request_id) is billed with
        another payload, which were therefore not written."""
        found: list[tuple[Any, Any]] = []
        for start in range(0, len(entries), self._max_batch):
            chunk = entries[start : start + self._max_batch]
            unique, repeats, _ = split_repeats(chunk, self._key)
            outcomes = self._timed_commit(unique, repeats, False)
            found += conflicting([*unique, *repeats], outcomes, self._view)
        return found


class _SkipDatabase(Exception):
    pass


def _settle(
    items: list[_Item], outcomes: list[WriteOutcome] | None, error: BaseException | None = None
) -> None:
    """Settle every submitter of a batch: one cross-thread call per event loop.

    A submitter that gave up (cancelled) is skipped, but its record was written all the
    same: once enqueued, a record is never dropped.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, object]]] = {}
    pos = 0
    for entries, future, loop in items:
        n = len(entries)
        if loop is None:
            _resolve(future, outcomes[pos : pos + n] if error is None else None, error)
        else:
            pairs = by_loop.get(loop)
            if pairs is None:
                pairs = by_loop[loop] = []
            # asyncio submitters always queue exactly one entry
            pairs.append((future, error if error is not None else outcomes[pos]))
        pos += n
    for loop, pairs in by_loop.items():
        # RuntimeError: the submitter's loop is closed, so nobody is waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_in_loop, pairs)


def _settle_in_loop(pairs: list[tuple[asyncio.Future, object]]) -> None:
    for future, result in pairs:
        if future.done():  # cancelled by its submitter
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _resolve(
    future: concurrent.futures.Future, result: object = None, error: BaseException | None = None
) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
