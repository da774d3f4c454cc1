"""ERNIE adapter on a real Paddle predictor, with the untrained demo model.

Built once per module into tmp by models.ernie.demo.make_demo_ernie. Checks output
shapes for both tasks, billing (len(input_ids) incl. [CLS]/[SEP], truncation billed as
max_seq_len), per-request usage under dynamic batching, and input errors.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from models.base import InvalidInput, ModelError
from models.batching import DynamicBatcher
from models.ernie.adapter import ErnieAdapter, ErnieInput, ErnieResult
from models.ernie.demo import make_demo_ernie
from models.usage import RequestUsage, bind_usage, set_stage_factory

HIDDEN = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo_ernie")
    message = make_demo_ernie(directory, seed=3, hidden_size=HIDDEN, layers=2)
    assert "UNTRAINED" in message and str(directory) in message
    return directory


@pytest.fixture(scope="module")
def classifier(model_dir: Path):
    adapter = ErnieAdapter(
        "ernie", {"model_dir": str(model_dir), "max_seq_len": 16, "max_wait_ms": 20}
    )
    adapter.load()
    yield adapter
    adapter.close()


@pytest.fixture(scope="module")
def embedder(model_dir: Path):
    adapter = ErnieAdapter("ernie-emb", {"model_dir": str(model_dir), "task": "embeddings"})
    adapter.load()
    yield adapter
    adapter.close()


def test_export_layout(model_dir: Path) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert {"inference.pdiparams", "vocab.txt", "tokenizer_config.json",
            "special_tokens_map.json", "paddle_meter.json"} <= names
    assert names & {"inference.pdmodel", "inference.json"}
    meta = json.loads((model_dir / "paddle_meter.json").read_text())
    assert meta["untrained"] is True and meta["labels"] == ["negative", "positive"]


def test_classification_and_usage(classifier: ErnieAdapter) -> None:
    usage = RequestUsage()
    with bind_usage(usage):
        results = classifier.infer([ErnieInput("今天天气很好"), ErnieInput("hello", "world!")])
    first, second = results
    assert isinstance(first, ErnieResult) and first.label in ("negative", "positive")
    assert len(first.logits) == 2 and 0.5 <= first.score <= 1.0
    assert first.embedding is None
    # 6 CJK characters + [CLS] [SEP]; "hello" [SEP] "world" "!" + [CLS] [SEP].
    assert first.input_tokens == 8 and second.input_tokens == 6
    assert usage.input_tokens == 14 and not usage.truncated


def test_counts_equal_tokenizer(classifier: ErnieAdapter) -> None:
    text = "Invoice №42: total ¥1,000 (含税) ™ café"
    [result] = classifier.infer([ErnieInput(text)])
    full = len(classifier.tokenizer.encode(text).input_ids)  # untruncated ids, own path
    assert full > 16  # so this text exercises truncation to max_seq_len (16 here)
    assert result.input_tokens == classifier.tokenizer.count(text, max_seq_len=16) == 16
    assert result.truncated


def test_truncation_billed_as_max_seq_len(classifier: ErnieAdapter) -> None:
    usage = RequestUsage()
    with bind_usage(usage):
        [result] = classifier.infer([ErnieInput("这是一个很长的句子" * 10)])
    assert result.truncated and result.input_tokens == 16
    assert usage.input_tokens == 16 and usage.truncated


def test_embeddings_shape(embedder: ErnieAdapter) -> None:
    results = embedder.infer([ErnieInput("向量"), ErnieInput("a longer english sentence")])
    assert all(len(r.embedding) == HIDDEN and r.logits is None for r in results)
    assert embedder.operation == "embeddings"
    # tanh pooler: bounded, and different texts embed differently.
    assert np.abs(results[0].embedding).max() <= 1.0
    assert results[0].embedding != results[1].embedding


def test_empty_text_is_invalid_and_not_billed(classifier: ErnieAdapter) -> None:
    usage = RequestUsage()
    with bind_usage(usage):
        results = classifier.infer([ErnieInput(""), ErnieInput("好"), ErnieInput("  \n")])
    assert isinstance(results[0], InvalidInput) and isinstance(results[2], InvalidInput)
    assert isinstance(results[1], ErnieResult)
    assert usage.input_tokens == 3


def test_unknown_option_rejected(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown ernie option"):
        ErnieAdapter("ernie", {"model_dir": str(model_dir), "max_len": 8})
    with pytest.raises(ValueError, match="task"):
        ErnieAdapter("ernie", {"model_dir": str(model_dir), "task": "ner"})


async def test_concurrent_requests_get_own_answers(classifier: ErnieAdapter) -> None:
    texts = [f"请求 number {i} " + "字" * (i % 9) + "!" * (i % 4) for i in range(32)]
    alone = [classifier.infer([ErnieInput(t)])[0] for t in texts]
    spans: list[tuple[str, dict, list]] = []

    def factory(name, attrs, links):
        spans.append((name, dict(attrs), list(links)))
        import contextlib

        return contextlib.nullcontext()

    async def one(i: int) -> tuple[ErnieResult, RequestUsage]:
        usage = RequestUsage(request_id=str(i), trace_link=f"link-{i}")
        with bind_usage(usage):
            await asyncio.sleep(0)
            result = await classifier.infer_async(ErnieInput(texts[i]))
        return result, usage

    set_stage_factory(factory)
    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(32)))
    finally:
        set_stage_factory(None)
    for i, (result, usage) in enumerate(outcomes):
        assert result.input_tokens == alone[i].input_tokens, i
        assert np.allclose(result.logits, alone[i].logits, atol=1e-4), i
        assert usage.input_tokens == alone[i].input_tokens, i
    infer_spans = [s for s in spans if s[0] == "ernie.infer"]
    # Batched: fewer model runs than requests, each linking the requests it served.
    assert len(infer_spans) < 32
    assert sorted(link for s in infer_spans for link in s[2]) == sorted(
        f"link-{i}" for i in range(32)
    )
    assert sum(1 for s in spans if s[0] == "ernie.tokenize") == 32


async def test_infer_async_errors_are_per_request(classifier: ErnieAdapter) -> None:
    async def bad() -> None:
        await classifier.infer_async(ErnieInput(""))

    good = asyncio.gather(*(classifier.infer_async(ErnieInput(f"ok {i}")) for i in range(4)))
    with pytest.raises(InvalidInput):
        await bad()
    assert all(isinstance(r, ErnieResult) for r in await good)


async def test_batcher_errors_and_close() -> None:
    def run(items: list[int]) -> list[int | ModelError]:
        if 99 in items:
            raise RuntimeError("whole batch broke")
        return [ModelError("odd") if x % 2 else x * 10 for x in items]

    batcher: DynamicBatcher[int, int | ModelError] = DynamicBatcher(run, 4, 5)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(6)),
                                   return_exceptions=True)
    assert results[0] == 0 and results[2] == 20 and isinstance(results[1], ModelError)
    with pytest.raises(RuntimeError, match="whole batch"):
        await batcher.submit(99)
    pending = asyncio.ensure_future(batcher.submit(4))
    await asyncio.sleep(0)
    await batcher.aclose()
    assert await pending == 40
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit(1)
