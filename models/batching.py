"""Asyncio dynamic batcher: concurrent requests -> one model batch -> one answer each.

The ERNIE adapter puts one of these in front of its predictor pool, and the OCR adapter
one in front of recognition (text-line crops of concurrent images). ``submit`` is
awaited by each request on the event loop; a collector task gathers items until
``max_batch_size`` are waiting or ``max_wait_ms`` passed since the first one, then runs
``run_batch`` on a worker thread of ``executor`` (never on the loop; the adapters pass
the host's inference pool). With a ``sort_key`` the collector gathers up to
``sort_window`` batches' worth of what is waiting, sorts it by the key and cuts it into
batches in that order (ERNIE: by length, so mixed traffic pads less); with
``split_by_key`` a batch also never mixes keys (OCR: one padded width per batch, so a
line's text never depends on which other lines shared its batch). ``run_batch`` returns
one result per item in order;
an item's result that is an ``Exception`` is raised to that item's caller only, and an
exception from ``run_batch`` itself goes to every item of the batch. ``aclose`` runs
what is queued before it returns.

The queue is bounded: with ``max_queue`` items waiting for a batch, ``submit`` raises
:class:`models.base.Overloaded` at once instead of queueing more (the caller hears
RESOURCE_EXHAUSTED / 503), so a burst cannot grow memory without limit.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

from models.base import Overloaded, Unavailable

__all__ = ["BatcherClosed", "BatcherSlot", "DynamicBatcher"]

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """``submit`` after ``aclose``."""


class DynamicBatcher(Generic[T, R]):
    """Groups concurrent ``submit`` calls into batches for a blocking ``run_batch``.

    ``max_concurrency`` batches may run at once (match it to the predictor pool size);
    ``executor`` is the thread pool they run on (the loop's default when None);
    ``max_queue`` items may wait for a batch; ``sort_key``, ``sort_window`` and
    ``split_by_key`` order and cut what is waiting (module docstring); ``more_coming``,
    when given, is asked before the collector waits for more items: False (no caller is
    about to submit) runs what is there at once. The batcher binds to the event loop of
    its first ``submit``.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        *,
        max_concurrency: int = 1,
        executor: Executor | None = None,
        max_queue: int = 1024,
        sort_key: Callable[[T], Any] | None = None,
        sort_window: int = 1,
        split_by_key: bool = False,
        more_coming: Callable[[], bool] | None = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if not isinstance(max_wait_ms, int | float) or max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer, got {max_queue!r}")
        if not isinstance(sort_window, int) or sort_window < 1:
            raise ValueError(f"sort_window must be a positive integer, got {sort_window!r}")
        if split_by_key and sort_key is None:
            raise ValueError("split_by_key needs a sort_key")
        self._sort_key = sort_key
        self._split_by_key = split_by_key
        self._more_coming = more_coming
        # Without a key there is nothing to sort: gather exactly one batch.
        self._gather_limit = max_batch_size * (sort_window if sort_key is not None else 1)
        self.max_queue = max_queue
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self._executor = executor
        self._max_concurrency = max_concurrency
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]] | None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this batcher is bound to (None until the first submit)."""
        return self._loop

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its own result; raises its own error."""
        if self._closed:
            raise BatcherClosed("batcher is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("this batcher belongs to another event loop")
        if self._queue is None:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._slots = asyncio.Semaphore(self._max_concurrency)
            self._collector = asyncio.get_running_loop().create_task(self._collect())
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(
                f"{self._queue.qsize()} items are already waiting for a batch "
                "(the model's max_queued_items); retry later"
            )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                return
            gathered = [first]
            deadline = loop.time() + self.max_wait
            while len(gathered) < self._gather_limit:
                remaining = deadline - loop.time()
                try:
                    if not self._queue.empty() or remaining <= 0:
                        entry = self._queue.get_nowait()
                    elif len(gathered) >= self.max_batch_size:
                        break  # a full batch is ready and nothing else waits: run it
                    elif self._more_coming is not None and not self._more_coming():
                        break  # no other caller is on its way: waiting only adds latency
                    else:
                        entry = await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if entry is None:  # aclose: run what we hold, then stop
                    stopping = True
                    break
                gathered.append(entry)
            try:
                batches = self._cut(gathered)
            except Exception as exc:  # a sort key that fails: those callers hear it, the
                for _, future in gathered:  # collector lives on for everyone else
                    if not future.done():
                        future.set_exception(exc)
                continue
            for batch in batches:
                await self._dispatch(batch)

    def _cut(
        self, gathered: list[tuple[T, asyncio.Future[R]]]
    ) -> list[list[tuple[T, asyncio.Future[R]]]]:
        """What was gathered as batches: sorted by key when there is one (stable, so equal
        keys keep arrival order), at most ``max_batch_size`` each, never mixing keys when
        ``split_by_key``."""
        size = self.max_batch_size
        key = self._sort_key
        if key is None:
            return [gathered[i : i + size] for i in range(0, len(gathered), size)]
        ordered = sorted(gathered, key=lambda entry: key(entry[0]))
        if not self._split_by_key:
            return [ordered[i : i + size] for i in range(0, len(ordered), size)]
        batches = []
        for _, group in itertools.groupby(ordered, key=lambda entry: key(entry[0])):
            same = list(group)
            batches += [same[i : i + size] for i in range(0, len(same), size)]
        return batches

    async def _dispatch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        assert self._slots is not None
        # Requests cancelled while waiting need no model time.
        batch = [(item, fut) for item, fut in batch if not fut.done()]
        if not batch:
            return
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        assert self._slots is not None
        try:
            items = [item for item, _ in batch]
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, items)
                if len(results) != len(items):
                    raise RuntimeError(
                        f"run_batch returned {len(results)} results for {len(items)} items"
                    )
            except Exception as exc:  # the whole batch failed: every caller hears it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        """Stop taking items, finish queued and running batches; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._queue is None or self._collector is None:
            return
        self._queue.put_nowait(None)  # after everything already queued
        await self._collector
        if self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)


class BatcherSlot(Generic[T, R]):
    """An adapter's handle on its batcher: created on first use on the serving loop,
    replaced when served from a new loop, drained once at shutdown.

    ``make`` builds the batcher; ``what`` names the model in the shutdown message.
    """

    def __init__(self, make: Callable[[], DynamicBatcher[T, R]], what: str) -> None:
        self._make = make
        self._what = what
        self._batcher: DynamicBatcher[T, R] | None = None
        self._lock = threading.Lock()
        self.draining = False

    def get(self) -> DynamicBatcher[T, R]:
        """The batcher for the running loop; raises Unavailable once draining."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.draining:
                raise Unavailable(f"{self._what} is shutting down")
            if self._batcher is not None and self._batcher.loop not in (None, loop):
                # Served from a new event loop (the old one is gone, e.g. between tests or
                # after a server restart in-process): its batcher cannot be reused.
                self._batcher = None
            if self._batcher is None:
                self._batcher = self._make()
            return self._batcher

    async def aclose(self) -> None:
        """Take no more items; run every queued and running batch to its end."""
        with self._lock:
            self.draining = True
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.aclose()
