"""ERNIE adapter: sequence classification or embeddings from a PaddleNLP-style export.

One instance per configured ERNIE model. Texts are tokenized with
:class:`~models.ernie.tokenizer.ErnieTokenizerFast` (ids exactly as PaddleNLP's), padded
into a batch and run on a predictor pool. Every item bills ``input_tokens`` =
len(input_ids) with [CLS]/[SEP] after truncation to ``max_seq_len``, plus ``truncated``.

Two ways in:
- ``infer(batch)`` (blocking, off the loop): the batch belongs to the current request,
  usage goes to the current :class:`~models.usage.RequestUsage`;
- ``await infer_async(item)`` (what the host uses: ``uses_infer_async``): one request's
  item, grouped with other requests' items by a
  :class:`~models.batching.DynamicBatcher`; the request's own usage object is
  captured in its task, so a shared batch never bills the wrong request.

Blocking work of ``infer_async`` (batches, long texts' tokenization) runs on the host's
inference pool (``bind_executor``); ``aclose`` drains the batcher at shutdown.
``count_tokens`` tokenizes without inference, for ``/v1/tokenize``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import stages as st
from models.base import InvalidInput, ModelAdapter, ModelError, TokenCount, Unavailable
from models.batching import BatcherSlot, DynamicBatcher
from models.ernie.export_layout import read_meta
from models.ernie.tokenizer import Encoding, ErnieTokenizerFast
from models.runtime import PredictorPool, RuntimeOptions
from models.usage import UsageEstimate, current_usage, report_usage, stage, trace_link

__all__ = ["ErnieAdapter", "ErnieInput", "ErnieResult"]

TASKS = ("text_classification", "embeddings")
_OPTIONS = frozenset(
    [
        "model_dir",
        "task",
        "max_seq_len",
        "labels",
        "cpu_threads",
        "pool_size",
        "device",
        "version",
        "max_batch_size",
        "max_wait_ms",
        "batching",
        "max_queued_items",
        "batch_sort_window",
        "runtime",
        "precision",
    ]
)
_INLINE_CHARS = 20_000  # longer texts are tokenized on a thread, not on the event loop
_MIN_SEQ_LEN = 4  # [CLS] a [SEP] b [SEP] must still fit one token per side


@dataclass(frozen=True)
class ErnieInput:
    """One text (and optional second text of a pair) to classify or embed."""

    text: str
    text_pair: str | None = None


@dataclass
class ErnieResult:
    """Output for one input; ``logits`` for classification, ``embedding`` otherwise."""

    label: str | None
    score: float | None
    logits: list[float] | None
    embedding: list[float] | None
    input_tokens: int
    truncated: bool


@dataclass
class _Encoded:
    encoding: Encoding
    link: Any = None


def _int_option(options: Mapping[str, Any], key: str, default: int | None, low: int) -> Any:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"ernie option {key!r} must be an integer >= {low}, got {value!r}")
    return value


class ErnieAdapter(ModelAdapter):
    """ERNIE served from ``model_dir``; see the module docstring for options and usage."""

    model_kind = "ernie"
    uses_infer_async = True

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(f"unknown ernie option(s) {unknown}; allowed: {sorted(_OPTIONS)}")
        super().__init__(name, options)
        if not options.get("model_dir"):
            raise ValueError("ernie option 'model_dir' is required")
        self.model_dir = Path(options["model_dir"])
        self.task = options.get("task", "text_classification")
        if self.task not in TASKS:
            raise ValueError(f"ernie option 'task' must be one of {TASKS}, got {self.task!r}")
        self.operation = self.task
        self.max_seq_len = _int_option(options, "max_seq_len", 128, _MIN_SEQ_LEN)
        self.cpu_threads = _int_option(options, "cpu_threads", None, 1)
        self.pool_size = _int_option(options, "pool_size", 1, 1)
        self.max_batch_size = _int_option(options, "max_batch_size", 16, 1)
        # Items waiting for a batch; more are refused (Overloaded) rather than queued.
        self.max_queued_items = _int_option(options, "max_queued_items", 1024, 1)
        # Up to this many batches' worth of waiting items are sorted by length before they
        # are cut into batches: mixed short and long traffic pads less (1: arrival order).
        self.batch_sort_window = _int_option(options, "batch_sort_window", 4, 1)
        max_wait_ms = options.get("max_wait_ms", 5)
        if (
            isinstance(max_wait_ms, bool)
            or not isinstance(max_wait_ms, int | float)
            or (max_wait_ms < 0)
        ):
            raise ValueError(f"ernie option 'max_wait_ms' must be >= 0, got {max_wait_ms!r}")
        self.max_wait_ms = float(max_wait_ms)
        self.batching = options.get("batching", True)
        if not isinstance(self.batching, bool):
            raise ValueError(f"ernie option 'batching' must be true/false, got {self.batching!r}")
        labels = options.get("labels")
        if labels is not None and (
            not isinstance(labels, list | tuple) or not all(isinstance(x, str) for x in labels)
        ):
            raise ValueError(f"ernie option 'labels' must be a list of strings, got {labels!r}")
        self.labels: list[str] | None = list(labels) if labels is not None else None
        self.runtime = RuntimeOptions(
            device=options.get("device", "cpu"),
            cpu_threads=self.cpu_threads,
            runtime=options.get("runtime", "auto"),
            precision=options.get("precision", "f32"),
        )
        self.tokenizer: ErnieTokenizerFast | None = None
        self._pool: PredictorPool | None = None
        self._outputs: dict[str, int] = {}
        self._batcher: BatcherSlot[_Encoded, ErnieResult | ModelError] = BatcherSlot(
            self._new_batcher, f"ernie model {name!r}"
        )

    # -- lifecycle --------------------------------------------------------------------

    def load(self) -> None:
        """Read the tokenizer files and side files, build the predictor pool. Blocks."""
        self.tokenizer = ErnieTokenizerFast.from_dir(self.model_dir)
        meta = read_meta(self.model_dir)
        limit = meta.get("max_position_embeddings")
        if isinstance(limit, int) and self.max_seq_len > limit:
            raise ValueError(
                f"max_seq_len {self.max_seq_len} exceeds the model's {limit} positions"
            )
        if self.labels is None:
            self.labels = list(meta.get("labels") or []) or None
        self._outputs = {name: i for i, name in enumerate(meta.get("outputs") or [])}
        runtime = self.runtime.with_cache_dir(self.cache_dir)
        self._pool = PredictorPool(self.model_dir, runtime, self.pool_size)

    def runtime_description(self) -> str:
        return self._pool.runtime if self._pool is not None else ""

    def is_ready(self) -> bool:
        return self._pool is not None

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    async def aclose(self) -> None:
        """Run every queued and running batch to its end, then take no more; idempotent.

        ``infer_async`` afterwards raises :class:`~models.base.Unavailable`; ``close``
        (which the host calls next) releases the predictors.
        """
        await self._batcher.aclose()

    # -- inference --------------------------------------------------------------------

    def encode(self, item: ErnieInput) -> Encoding:
        """Validate and tokenize one input (span ``ernie.tokenize``); raises InvalidInput."""
        if self.tokenizer is None:
            raise RuntimeError(f"ernie model {self.name!r} is not loaded")
        if not isinstance(item, ErnieInput):
            raise InvalidInput(f"expected an ErnieInput, got {type(item).__name__}")
        if not isinstance(item.text, str) or not item.text.strip():
            raise InvalidInput("text is empty")
        if item.text_pair is not None and (
            not isinstance(item.text_pair, str) or not item.text_pair.strip()
        ):
            raise InvalidInput("text_pair is empty; omit it for a single text")
        with stage(st.STAGE_ERNIE_TOKENIZE, {st.ERNIE_MAX_SEQ_LEN: self.max_seq_len}):
            return self.tokenizer.encode(item.text, item.text_pair, self.max_seq_len)

    def count_tokens(self, text: Any, text_pair: Any = None) -> TokenCount:
        """The ids ``infer`` would bill for this text (pair), without inference. Blocks;
        raises InvalidInput for non-string or empty texts."""
        if not isinstance(text, str) or (text_pair is not None and not isinstance(text_pair, str)):
            raise InvalidInput("'text' (and 'text_pair' if given) must be strings")
        encoding = self.encode(ErnieInput(text, text_pair))
        return TokenCount(
            input_ids=list(encoding.input_ids),
            token_type_ids=list(encoding.token_type_ids),
            truncated=bool(encoding.truncated),
            max_seq_len=self.max_seq_len,
        )

    def estimate_usage(self, batch: Sequence[Any]) -> UsageEstimate:
        """The exact input tokens ``infer`` will bill (tokenized now); unusable items
        count nothing (inference refuses them)."""
        tokens = 0
        for item in batch:
            try:
                tokens += len(self.encode(item).input_ids)
            except ModelError:
                continue
        return UsageEstimate(input_tokens=tokens)

    def infer(self, batch: Sequence[ErnieInput]) -> list[ErnieResult | ModelError]:
        """Run one request's items; usage goes to the current request. Blocks."""
        encoded: list[_Encoded | ModelError] = []
        for item in batch:
            try:
                encoded.append(_Encoded(self.encode(item), trace_link()))
            except ModelError as exc:
                encoded.append(exc)
        valid = [e for e in encoded if isinstance(e, _Encoded)]
        ran: list[ErnieResult | ModelError] = []
        for start in range(0, len(valid), self.max_batch_size):
            ran += self._run_batch(valid[start : start + self.max_batch_size])
        outputs = iter(ran)
        results: list[ErnieResult | ModelError] = []
        for entry in encoded:
            result = entry if isinstance(entry, ModelError) else next(outputs)
            if isinstance(result, ErnieResult):
                report_usage(input_tokens=result.input_tokens, truncated=result.truncated)
            results.append(result)
        return results

    async def infer_async(self, item: ErnieInput) -> ErnieResult:
        """One item through the dynamic batcher (or alone on a thread when batching is
        off); raises its ModelError. Usage goes to the calling request's usage."""
        usage = current_usage()  # this request's, captured in its own task
        text = getattr(item, "text", None)
        if isinstance(text, str) and len(text) > _INLINE_CHARS:
            # A long text would hold the event loop; run_blocking keeps the request context.
            encoding = await self.run_blocking(self.encode, item)
        else:
            encoding = self.encode(item)
        encoded = _Encoded(encoding, trace_link())
        if self.batching:
            result = await self._batcher.get().submit(encoded)
        else:
            if self._batcher.draining:
                raise Unavailable(f"ernie model {self.name!r} is shutting down")
            result = (await self.run_blocking(self._run_batch, [encoded]))[0]
        if isinstance(result, ModelError):
            raise result
        if usage is not None:
            usage.add(input_tokens=result.input_tokens, truncated=result.truncated)
        return result

    def _new_batcher(self) -> DynamicBatcher[_Encoded, ErnieResult | ModelError]:
        return DynamicBatcher(
            self._run_batch,
            self.max_batch_size,
            self.max_wait_ms,
            max_concurrency=self.pool_size,
            max_queue=self.max_queued_items,
            # The host's pool; no request's context: a batch serves (links) several.
            executor=self.executor,
            sort_key=lambda entry: len(entry.encoding.input_ids),
            sort_window=self.batch_sort_window,
        )

    def _run_batch(self, batch: list[_Encoded]) -> list[ErnieResult | ModelError]:
        """Pad, run, post-process a batch of encoded items. Blocks; never reports usage
        (it may run on a thread serving several requests)."""
        pool = self._pool
        if pool is None:
            return [ModelError(f"ernie model {self.name!r} is not loaded")] * len(batch)
        width = max(len(e.encoding.input_ids) for e in batch)
        pad_id = self.tokenizer.vocab.get(self.tokenizer.special_tokens["pad_token"], 0)
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64)
        for row, entry in enumerate(batch):
            n = len(entry.encoding.input_ids)
            ids[row, :n] = entry.encoding.input_ids
            types[row, :n] = entry.encoding.token_type_ids
        feeds = {"input_ids": ids, "token_type_ids": types}
        names = pool.input_names()
        missing = [n for n in names if n not in feeds]
        if missing:
            error = ModelError(f"model input(s) {missing} are not supported by this adapter")
            return [error] * len(batch)
        attrs = {st.ERNIE_BATCH_SIZE: len(batch), st.ERNIE_SEQ_LEN: width, st.ERNIE_TASK: self.task}
        links = [e.link for e in batch if e.link is not None]
        try:
            with stage(st.STAGE_ERNIE_INFER, attrs, links=links):
                outputs = pool.run([feeds[n] for n in names])
        except Exception as exc:  # a broken run fails its batch, never the server
            return [ModelError(f"ernie inference failed: {exc}")] * len(batch)
        return [self._result(entry.encoding, outputs, row) for row, entry in enumerate(batch)]

    def _result(self, encoding: Encoding, outputs: list[np.ndarray], row: int) -> ErnieResult:
        tokens, truncated = len(encoding.input_ids), encoding.truncated
        if self.task == "embeddings":
            index = self._outputs.get("pooled_output", 1 if len(outputs) > 1 else 0)
            vector = outputs[index][row]
            if vector.ndim == 2:  # a sequence output: take [CLS]
                vector = vector[0]
            return ErnieResult(None, None, None, vector.astype(float).tolist(), tokens, truncated)
        logits = outputs[self._outputs.get("logits", 0)][row].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        label = self.labels[best] if self.labels and best < len(self.labels) else str(best)
        return ErnieResult(label, float(probs[best]), logits.tolist(), None, tokens, truncated)
