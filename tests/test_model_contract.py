"""The adapter contract as the host drives it (models/base.py, serving/model_host.py).

Defaults of the base class (no tokenizer, no async path, nothing to drain), and the demo
ERNIE model under a real :class:`ModelHost`: its batches run on the host's bounded pool,
``count_tokens`` bills what inference bills, and ``aclose`` drains queued batches before
the predictors close.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest

from models.base import InvalidInput, ModelAdapter, TokenCount, Unavailable, Unsupported
from models.ernie.adapter import ErnieInput, ErnieResult
from models.ernie.demo import make_demo_ernie
from models.usage import set_stage_factory
from serving.errors import ServingError
from serving.model_host import ModelHost


class _Echo(ModelAdapter):
    model_kind = "echo"

    def load(self) -> None:
        self.loaded = True

    def is_ready(self) -> bool:
        return getattr(self, "loaded", False)

    def infer(self, batch):
        return list(batch)


async def test_base_defaults() -> None:
    adapter = _Echo("e", {})
    assert adapter.uses_infer_async is False and adapter.executor is None
    with pytest.raises(Unsupported, match="model 'e' is a echo model without a tokenizer") as err:
        adapter.count_tokens("text")
    assert err.value.kind == "invalid_argument"
    await adapter.aclose()  # nothing to drain
    adapter.close()
    assert TokenCount([1, 5, 2], [0, 0, 0], False, 8).count == 3


def test_ocr_has_no_tokenizer() -> None:
    from models.ocr import OcrAdapter

    ocr = OcrAdapter("ocr")  # not loaded: counting needs no model files
    assert ocr.uses_infer_async is True  # recognition batches concurrent requests' crops
    assert OcrAdapter("ocr", {"rec_batching": False}).uses_infer_async is False
    with pytest.raises(Unsupported, match="^model 'ocr' is a ocr model without a tokenizer$"):
        ocr.count_tokens("text")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("contract_ernie")
    make_demo_ernie(directory, seed=5, hidden_size=32, layers=1)
    return directory


def _host(model_dir: Path) -> ModelHost:
    host = ModelHost(
        {
            "ernie": {
                "kind": "ernie",
                "options": {"model_dir": str(model_dir), "max_seq_len": 16, "max_wait_ms": 50},
            }
        },
        {"inference_threads": 2},
    )
    host.load()
    return host


async def test_ernie_under_the_host(model_dir: Path) -> None:
    host = _host(model_dir)
    served = host.get("ernie")
    threads: list[str] = []

    def factory(name, attrs, links):
        if name == "ernie.infer":
            threads.append(threading.current_thread().name)
        return contextlib.nullcontext()

    set_stage_factory(factory)
    try:
        results = await asyncio.gather(*(served.run([ErnieInput(f"text {i}")]) for i in range(6)))
        counted = await served.count_tokens("text 1 " * 10)
        with pytest.raises(ServingError, match="must be strings") as err:
            await served.count_tokens(7)
        assert err.value.kind == "invalid_argument"
        # A batch still queued when shutdown starts is run, not dropped.
        queued = asyncio.ensure_future(served.run([ErnieInput("late but accepted")]))
        await asyncio.sleep(0)
        await host.aclose(timeout_s=30)
        (late,) = await queued
    finally:
        set_stage_factory(None)
    assert all(isinstance(r[0], ErnieResult) for r in results) and isinstance(late, ErnieResult)
    # Batched on the host's pool, never on the loop's default executor.
    assert threads and all(name.startswith("inference") for name in threads), threads
    assert counted.truncated and counted.count == counted.max_seq_len == 16
    assert served.adapter.count_tokens("text 1 " * 10) == counted
    with pytest.raises(Unavailable, match="shutting down"):
        await served.adapter.infer_async(ErnieInput("after shutdown"))
    assert not host.all_ready()
    await host.aclose()  # idempotent


def test_ernie_count_tokens_validates(model_dir: Path) -> None:
    host = _host(model_dir)
    try:
        adapter = host.get("ernie").adapter
        with pytest.raises(InvalidInput, match="text is empty"):
            adapter.count_tokens("  ")
        with pytest.raises(InvalidInput, match="must be strings"):
            adapter.count_tokens("a", ["b"])
    finally:
        host.close()
