"""The one contract every model adapter implements, and the errors it may return.

Shaped like Triton's python backend: ``load`` once, ``infer`` a batch and get one result
or one error per item (a bad item never takes its batch down), ``close`` once. This
module is all a new adapter needs to read; the host (``serving.model_host``) calls
nothing on an adapter that :class:`ModelAdapter` does not declare. In the host's order:

1. ``__init__(name, options)``: validate options (unknown keys raise ValueError);
2. ``bind_executor(executor)``: the host's bounded inference thread pool;
3. ``load()``: blocks; then ``is_ready()`` is True;
4. per request, ``infer(batch)`` on a pool thread, or, when the adapter sets
   ``uses_infer_async``, ``await infer_async(item)`` per item on the event loop;
   ``count_tokens(text, text_pair)`` (on a pool thread) for ``/v1/tokenize``;
5. at shutdown, after the frontends stopped: ``await aclose()`` then ``close()``.

Must provide: ``load``, ``infer``, ``is_ready``. May provide: ``close``, ``aclose``,
``infer_async`` (with ``uses_infer_async = True``), ``count_tokens``, ``operation``.
Adapters report usage through :mod:`models.usage` and never import telemetry.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from models.usage import UsageEstimate

__all__ = [
    "InvalidInput",
    "ModelAdapter",
    "ModelError",
    "Overloaded",
    "ResourceLimit",
    "TokenCount",
    "Unavailable",
    "Unsupported",
]

R = TypeVar("R")


class ModelError(Exception):
    """A per-item failure; frontends map ``kind`` to a gRPC code / HTTP status / err_no."""

    kind = "internal"


class InvalidInput(ModelError):
    """The caller sent something the model cannot use (not an image, empty text ...)."""

    kind = "invalid_argument"


class ResourceLimit(ModelError):
    """The input is over a configured limit (pixels, sequence length, size)."""

    kind = "resource_exhausted"


class Unsupported(ModelError):
    """The model does not offer what was asked (e.g. counting tokens on an OCR model).

    ``invalid_argument``, not ``unimplemented``: the server implements the call, the
    caller picked a model that cannot answer it.
    """

    kind = "invalid_argument"


class Unavailable(ModelError):
    """The model cannot take work right now (it is shutting down)."""

    kind = "unavailable"


class Overloaded(ModelError):
    """Too much work is queued already (a bounded queue is full); the caller should retry
    later. Raised at once rather than queueing without limit."""

    kind = "overloaded"


@dataclasses.dataclass(frozen=True)
class TokenCount:
    """What :meth:`ModelAdapter.count_tokens` returns: the ids a request would be billed for.

    ``count`` (= len(input_ids)) is exactly what inference on the same text would bill.
    """

    input_ids: list[int]
    token_type_ids: list[int]
    truncated: bool
    #: the limit texts are cut to (None when the model has none)
    max_seq_len: int | None

    @property
    def count(self) -> int:
        return len(self.input_ids)


class ModelAdapter(abc.ABC):
    """A served model: one instance per configured model name, shared by all frontends."""

    #: operation as recorded in the ledger: ocr / text_classification / embeddings
    operation: str = ""
    #: the config ``kind`` this adapter serves (ocr, ernie); used in messages
    model_kind: ClassVar[str] = ""
    #: False: the host runs ``infer(batch)`` on its pool. True: the host awaits
    #: ``infer_async(item)`` once per item (the adapter schedules its own work, e.g. a
    #: dynamic batcher grouping items of concurrent requests).
    uses_infer_async: bool = False

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.options = dict(options)
        self.version = str(self.options.get("version", "1"))
        self._executor: Executor | None = None
        self._cache_dir: Path | None = None

    # -- lifecycle --------------------------------------------------------------------

    def bind_executor(self, executor: Executor | None) -> None:
        """Give the adapter the host's bounded inference pool; called before ``load``.

        Blocking work an adapter schedules itself (``infer_async``) must run there, never
        on the event loop's default executor, so ``server.inference_threads`` bounds all
        model work. Without one (an adapter used directly), :attr:`executor` is None,
        which ``loop.run_in_executor`` reads as the loop's default executor.
        """
        self._executor = executor

    @property
    def executor(self) -> Executor | None:
        """The pool from :meth:`bind_executor` (None when unbound)."""
        return self._executor

    def bind_cache_dir(self, directory: Path | None) -> None:
        """Give the adapter a directory of its own for compiled models (the server passes
        ``<data_dir>/compiled/<model name>``); called before ``load``. Adapters on an
        engine that compiles (OpenVINO) keep their compiled blobs there, so a restart
        does not compile again. Without one nothing is cached."""
        self._cache_dir = directory

    @property
    def cache_dir(self) -> Path | None:
        """The directory from :meth:`bind_cache_dir` (None when unbound)."""
        return self._cache_dir

    async def run_blocking(self, fn: Callable[..., R], *args: Any) -> R:
        """Await ``fn(*args)`` on :attr:`executor`, in a copy of the caller's context (so
        usage and stage spans still find the request). For ``infer_async``."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(self._executor, ctx.run, fn, *args)

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and build predictors; called once before serving. Blocks."""

    def runtime_description(self) -> str:
        """Which engine runs the loaded model (e.g. "openvino"), for the start-up log;
        "" for an adapter without one."""
        return ""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        """True once ``load`` succeeded and until ``close``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook: most adapters hold no async work
        """Finish work queued on the event loop (e.g. batches waiting to run); idempotent.

        Awaited at shutdown after the frontends stopped and before :meth:`close`; an
        adapter must not take new work afterwards. Does nothing by default.
        """

    def close(self) -> None:  # noqa: B027 - optional hook: adapters without resources skip it
        """Release predictors; idempotent. Blocks."""

    # -- inference --------------------------------------------------------------------

    @abc.abstractmethod
    def infer(self, batch: Sequence[Any]) -> list[Any]:
        """Run a batch; return one result or one :class:`ModelError` per item. Blocks.

        Called on a pool thread carrying the request's context: usage reported with
        :func:`models.usage.report_usage` goes to that request.
        """

    async def infer_async(self, item: Any) -> Any:
        """One item of a request, awaited on the event loop; returns its result or
        raises its :class:`ModelError`. Called only when ``uses_infer_async`` is True;
        the adapter reports the item's usage to the calling request itself."""
        raise NotImplementedError(
            f"{type(self).__name__} sets uses_infer_async but does not define infer_async"
        )

    def estimate_usage(self, batch: Sequence[Any]) -> UsageEstimate:
        """What ``infer(batch)`` will report, as far as it is known before inference
        (budgets reserve it). Blocks; never raises: items it cannot read count nothing
        (inference rejects them). By default: one image per item for image models,
        nothing otherwise."""
        return UsageEstimate(images=len(batch) if self.model_kind == "ocr" else 0)

    def count_tokens(self, text: Any, text_pair: Any = None) -> TokenCount:
        """Tokenize without inference, exactly as ``infer`` would bill. Blocks.

        ``text`` / ``text_pair`` arrive as the caller sent them (not necessarily strings):
        raise :class:`InvalidInput` for unusable ones. By default the model has no
        tokenizer, and this raises :class:`Unsupported`.
        """
        kind = self.model_kind or type(self).__name__
        raise Unsupported(f"model {self.name!r} is a {kind} model without a tokenizer")
