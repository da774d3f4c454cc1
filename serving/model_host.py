"""The served models of one process: built from config, shared by every frontend.

Adapters block (they run Paddle), so :meth:`ServedModel.run` moves inference onto a bounded
thread pool, carrying the request's context (its usage object and span) into the thread,
and enforces the per-request timeout. Adapters that schedule their own work
(``uses_infer_async``) get the same pool through ``bind_executor``. Only what
:class:`models.base.ModelAdapter` declares is called; adapter kinds come from an explicit
registry, the one place here that names models.

The pool is bounded twice: ``server.inference_threads`` threads, and at most
``server.max_queued_inferences`` more jobs waiting for one (:class:`BoundedExecutor`). A
job past that is refused at once with :class:`models.base.Overloaded` (kind ``overloaded``:
RESOURCE_EXHAUSTED / 503 + Retry-After / err_no 3001), so a burst never queues without
limit. A job's slot is given back when its job is really over (its thread finished it, or
it was cancelled before it started), never when a caller stops waiting.

What happens to a timed-out inference: the caller gets DEADLINE_EXCEEDED / 504 after
``server.request_timeout_s``. A job still waiting in the queue is cancelled and frees its
slot at once. A job already running cannot be stopped (Paddle offers no way to interrupt
a predictor): it runs to the end on its thread, its result is discarded, and it keeps its
slot until then. So hung or slow inferences hold slots visibly, and once all slots are
held, new calls get ``overloaded`` quickly instead of queueing behind them forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from interceptors.model_statistics import current_clock
from models.base import ModelAdapter, ModelError, Overloaded, TokenCount
from models.usage import UsageEstimate
from serving.codecs import Codec, codec_for_kind
from serving.errors import ServingError, unknown_model

__all__ = ["BoundedExecutor", "ModelHost", "ServedModel"]

log = logging.getLogger(__name__)

# Texts up to this many characters are tokenized for a budget estimate on the event loop.
_INLINE_ESTIMATE_CHARS = 4096
_ADAPTERS = {
    "ocr": ("models.ocr", "OcrAdapter"),
    "ernie": ("models.ernie.adapter", "ErnieAdapter"),
}


def _adapter_class(kind: str) -> type[ModelAdapter]:
    try:
        module_name, class_name = _ADAPTERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown model kind {kind!r}; known kinds: {', '.join(_ADAPTERS)}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)


def _timed_infer(infer: Callable[[list[Any]], Any], batch: list[Any], submitted_ns: int) -> Any:
    """``infer(batch)`` on a pool thread, adding the wait for the thread (``queue``) and
    the inference (``compute_infer``) to the call's clock, when it has one."""
    clock = current_clock()
    if clock is None:
        return infer(batch)
    started = time.perf_counter_ns()
    clock.add("queue", started - submitted_ns)
    try:
        return infer(batch)
    finally:
        clock.add("compute_infer", time.perf_counter_ns() - started)


class BoundedExecutor(concurrent.futures.Executor):
    """A thread pool of ``threads`` threads that holds at most ``threads + max_queued``
    jobs (running or waiting); ``submit`` past that raises :class:`Overloaded` at once.

    The slot of a job is released by its future's done callback, which runs when the job
    really ended: finished on its thread, or cancelled while still queued. Cancelling the
    asyncio side of ``loop.run_in_executor`` cancels a queued job (slot back at once) but
    not a running one (slot back when its thread finishes).
    """

    def __init__(
        self, threads: int, max_queued: int, thread_name_prefix: str = "inference"
    ) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=thread_name_prefix
        )
        self.capacity = threads + max_queued
        self._held = 0
        self._lock = threading.Lock()  # done callbacks run on pool threads
        self._message = (
            f"the server already has {self.capacity} inferences running or queued "
            f"(server.inference_threads {threads} + server.max_queued_inferences {max_queued}); "
            "retry later"
        )

    @property
    def held(self) -> int:
        """Jobs running or waiting now."""
        return self._held

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future:
        with self._lock:
            if self._held >= self.capacity:
                raise Overloaded(self._message)
            self._held += 1
        try:
            future = self._pool.submit(fn, *args, **kwargs)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: object = None) -> None:
        with self._lock:
            self._held -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


class ServedModel:
    """One configured model: its adapter, its codec, and how to run a batch safely."""

    def __init__(
        self,
        name: str,
        kind: str,
        adapter: ModelAdapter,
        codec: Codec,
        executor: concurrent.futures.Executor,
        timeout_s: float,
    ) -> None:
        self.name = name
        self.kind = kind
        self.adapter = adapter
        self.codec = codec
        self._executor = executor
        self._timeout_s = timeout_s

    @property
    def operation(self) -> str:
        return self.adapter.operation or self.codec.operation

    @property
    def version(self) -> str:
        return self.adapter.version

    async def run(self, batch: Sequence[Any]) -> list[Any]:
        """Infer a batch off the event loop; raise the first item's error as ServingError."""
        adapter = self.adapter
        clock = current_clock()  # Triton's queue / compute_infer statistics
        submitted = time.perf_counter_ns()
        if adapter.uses_infer_async:  # adapters with their own dynamic batching
            # Their batcher's queue is inside the adapter: all of it counts as compute_infer.
            work = asyncio.gather(
                *(adapter.infer_async(item) for item in batch), return_exceptions=True
            )
        else:
            loop = asyncio.get_running_loop()
            ctx = contextvars.copy_context()
            try:
                work = loop.run_in_executor(
                    self._executor, ctx.run, _timed_infer, adapter.infer, list(batch), submitted
                )
            except ModelError as exc:  # Overloaded: every slot is held
                raise ServingError(exc.kind, str(exc)) from None
        try:
            results = await asyncio.wait_for(work, self._timeout_s)
            if clock is not None and adapter.uses_infer_async:
                clock.add("compute_infer", time.perf_counter_ns() - submitted)
        except asyncio.TimeoutError:
            raise ServingError(
                "deadline_exceeded",
                f"model {self.name!r} did not answer within {self._timeout_s:g} s "
                "(server.request_timeout_s)",
            ) from None
        for index, result in enumerate(results):
            if isinstance(result, ModelError):
                prefix = f"item {index}: " if len(results) > 1 else ""
                raise ServingError(result.kind, prefix + str(result))
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def estimate(self, batch: Sequence[Any]) -> UsageEstimate:
        """What the batch will bill, as far as it is known before inference (budgets
        reserve it): inline for short texts, on a thread for long ones (tokenizing a
        long text would hold the event loop)."""
        text_chars = sum(
            len(text) for item in batch for text in (getattr(item, "text", None),
                                                     getattr(item, "text_pair", None))
            if isinstance(text, str)
        )
        if text_chars <= _INLINE_ESTIMATE_CHARS:
            return self.adapter.estimate_usage(batch)
        ctx = contextvars.copy_context()
        return await asyncio.to_thread(ctx.run, self.adapter.estimate_usage, list(batch))

    async def count_tokens(self, text: Any, text_pair: Any = None) -> TokenCount:
        """Tokenize on the pool without inference; ServingError for a model without a
        tokenizer or unusable text (the adapter's ModelError, kind and message kept)."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        try:
            return await loop.run_in_executor(
                self._executor, ctx.run, self.adapter.count_tokens, text, text_pair
            )
        except ModelError as exc:
            raise ServingError(exc.kind, str(exc)) from None


class ModelHost:
    """All models of this process, by name. ``load`` blocks; call it before serving."""

    def __init__(self, models_config: Mapping[str, Any], server_config: Mapping[str, Any]) -> None:
        self._config = dict(models_config or {})
        self._executor = BoundedExecutor(
            int(server_config.get("inference_threads", 8)),
            int(server_config.get("max_queued_inferences", 64)),
        )
        self._timeout_s = float(server_config.get("request_timeout_s", 60))
        self._models: dict[str, ServedModel] = {}

    def load(self, cache_dir: Path | None = None) -> None:
        """Build and load every configured model. Blocks. ``cache_dir`` (the server's
        ``<data_dir>/compiled``): each model gets its own subdirectory for compiled
        models."""
        for name, spec in self._config.items():
            kind = spec["kind"]
            try:
                adapter = _adapter_class(kind)(name, spec.get("options") or {})
                adapter.bind_executor(self._executor)
                adapter.bind_cache_dir(cache_dir / name if cache_dir is not None else None)
                log.info("loading model", extra={"model": name, "kind": kind})
                adapter.load()
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"model {name!r}: {exc}") from None
            except ValueError as exc:  # a bad option, or a model its runtime cannot read
                raise ValueError(f"model {name!r}: {exc}") from None
            log.info(
                "model loaded",
                extra={"model": name, "kind": kind, "runtime": adapter.runtime_description()},
            )
            self._models[name] = ServedModel(
                name, kind, adapter, codec_for_kind(kind, adapter), self._executor, self._timeout_s
            )

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise unknown_model(name, self._models) from None

    def default_name(self) -> str | None:
        """The model an unnamed pipeline request goes to: the first configured one."""
        return next(iter(self._models), None)

    def all_ready(self) -> bool:
        return bool(self._models) and all(m.adapter.is_ready() for m in self._models.values())

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Drain every adapter (``aclose``: queued batches run), then :meth:`close`.

        Awaited once the frontends stopped taking requests; idempotent. A drain that takes
        longer than ``timeout_s`` is logged and abandoned: closing goes on regardless.
        """
        models = list(self._models.values())
        drains = [asyncio.ensure_future(m.adapter.aclose()) for m in models]
        if drains:
            _, pending = await asyncio.wait(drains, timeout=timeout_s)
            for model, drain in zip(models, drains, strict=True):
                if drain in pending:
                    drain.cancel()
                    log.warning("draining model timed out", extra={"model": model.name})
                elif drain.exception() is not None:
                    log.error(
                        "draining model failed",
                        exc_info=drain.exception(),
                        extra={"model": model.name},
                    )
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Close every adapter and shut the inference pool down; idempotent. Blocks.

        Adapters with queued async work should be drained first (:meth:`aclose`)."""
        for model in self._models.values():
            try:
                model.adapter.close()
            except Exception:  # closing must go on for the other models
                log.exception("closing model failed", extra={"model": model.name})
        self._executor.shutdown(wait=False, cancel_futures=True)
