"""Paddle Inference predictors for exported models, and a pool that makes them shareable.

A ``paddle.inference`` predictor is not thread-safe, and with oneDNN it is not even safe
to use from one thread after another, so a served model holds a :class:`PredictorPool`
of N predictors, each created and run on its own dedicated thread; a request borrows
one for the duration of a run. Configuration follows what is fast and stable on
paddlepaddle 3.3 CPU builds for the legacy ``.pdmodel`` exports: oneDNN on, IR
optimisation on, and the new IR / new executor off (PIR crashes on these programs).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PredictorLease",
    "PredictorPool",
    "RuntimeOptions",
    "create_predictor",
    "find_model_files",
]

# oneDNN caches one set of primitives per input shape; OCR inputs vary in shape, so
# an unbounded cache grows without limit. PaddleOCR uses the same bound.
_ONEDNN_CACHE_CAPACITY = 10


class RuntimeOptions:
    """How predictors are built: device, CPU threads, oneDNN.

    ``device`` is ``"cpu"`` or ``"gpu"`` / ``"gpu:N"``; ``cpu_threads`` is the math
    library thread count per predictor (None lets Paddle choose).
    """

    def __init__(
        self, device: str = "cpu", cpu_threads: int | None = None, use_onednn: bool = True
    ) -> None:
        self.device_type, self.device_id = _parse_device(device)
        if cpu_threads is not None and (not isinstance(cpu_threads, int) or cpu_threads < 1):
            raise ValueError(f"cpu_threads must be a positive integer, got {cpu_threads!r}")
        self.cpu_threads = cpu_threads
        self.use_onednn = use_onednn

    def __repr__(self) -> str:
        device = self.device_type if self.device_type == "cpu" else f"gpu:{self.device_id}"
        return f"RuntimeOptions(device={device!r}, cpu_threads={self.cpu_threads!r})"


def _parse_device(device: str) -> tuple[str, int]:
    if not isinstance(device, str):
        raise ValueError(f"device must be a string like 'cpu' or 'gpu:0', got {device!r}")
    kind, _, index = device.strip().lower().partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "gpu" and (not index or index.isdigit()):
        return "gpu", int(index or 0)
    raise ValueError(f"device must be 'cpu', 'gpu' or 'gpu:N', got {device!r}")


def find_model_files(model_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Return (program file, params file) of an exported model directory.

    Accepts the legacy ``inference.pdmodel`` and the PIR ``inference.json`` program
    formats; raises FileNotFoundError naming what was looked for.
    """
    directory = Path(model_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    params = directory / "inference.pdiparams"
    for name in ("inference.pdmodel", "inference.json"):
        program = directory / name
        if program.is_file() and params.is_file():
            return program, params
    raise FileNotFoundError(
        f"model directory {str(directory)!r} holds no inference.pdmodel or inference.json "
        "next to inference.pdiparams"
    )


def create_predictor(model_dir: str | os.PathLike[str], options: RuntimeOptions) -> Any:
    """Build one ``paddle.inference`` predictor for ``model_dir``. Blocks (loads weights).

    Raises FileNotFoundError for a missing model, RuntimeError when a GPU is asked for
    on a CPU-only paddle build.
    """
    with warnings.catch_warnings():
        # paddle warns about a missing C++ compiler cache on import; irrelevant here.
        warnings.filterwarnings("ignore", message="No ccache found")
        from paddle import inference  # imported late: importing paddle costs ~1 s

    program, params = find_model_files(model_dir)
    config = inference.Config(str(program), str(params))
    if options.device_type == "gpu":
        import paddle

        if not paddle.device.is_compiled_with_cuda():
            raise RuntimeError(
                "device 'gpu' requested but the installed paddlepaddle is a CPU-only build; "
                "install paddlepaddle-gpu or use device 'cpu'"
            )
        config.enable_use_gpu(256, options.device_id)  # initial pool MB; it grows on demand
    else:
        config.disable_gpu()
        if options.cpu_threads is not None:
            config.set_cpu_math_library_num_threads(options.cpu_threads)
        if options.use_onednn:
            config.enable_onednn()
            config.set_onednn_cache_capacity(_ONEDNN_CACHE_CAPACITY)
    if program.suffix == ".pdmodel":
        # The new IR (PIR) and its executor crash on legacy programs in paddle 3.x.
        config.enable_new_ir(False)
        config.enable_new_executor(False)
        # Only the legacy pass pipeline has this pass: on PIR programs (inference.json)
        # create_predictor fails with "Not find ... memory_optimize_pass".
        config.enable_memory_optim()
    config.switch_ir_optim(True)
    config.switch_use_feed_fetch_ops(False)
    config.disable_glog_info()
    return inference.create_predictor(config)


def _run(predictor: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    names = predictor.get_input_names()
    if len(names) != len(inputs):
        raise ValueError(f"model takes {len(names)} inputs ({names}), got {len(inputs)}")
    for name, array in zip(names, inputs, strict=True):
        predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(array))
    predictor.run()
    return [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]


class PredictorLease:
    """One predictor of a pool, lent to one caller; runs happen on its own thread."""

    def __init__(self, worker: _PredictorThread) -> None:
        self._worker = worker

    @property
    def input_names(self) -> list[str]:
        return list(self._worker.input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self._worker.output_names)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Feed ``inputs`` in input order, return outputs in output order. Blocks."""
        return self._worker.submit(list(inputs)).result()


class _PredictorThread:
    """Owns one predictor and the only thread that ever touches it.

    Paddle's oneDNN kernels keep per-thread primitive caches; a predictor run from
    different threads over time (or det and rec predictors sharing one thread's cache)
    fails with "could not execute a primitive". Creating and running each predictor on
    one dedicated thread avoids that for a queue hand-off per run.
    """

    def __init__(self, model_dir: Path, options: RuntimeOptions, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[np.ndarray], Future] | None] = queue.SimpleQueue()
        ready: Future = Future()
        self._thread = threading.Thread(
            target=self._serve, args=(model_dir, options, ready), name=name, daemon=True
        )
        self._thread.start()
        self.input_names, self.output_names = ready.result()  # re-raises load errors

    def _serve(self, model_dir: Path, options: RuntimeOptions, ready: Future) -> None:
        try:
            predictor = create_predictor(model_dir, options)
        except BaseException as exc:  # handed to the constructor, which raises it
            ready.set_exception(exc)
            return
        ready.set_result((predictor.get_input_names(), predictor.get_output_names()))
        while (job := self._jobs.get()) is not None:
            inputs, result = job
            if not result.set_running_or_notify_cancel():
                continue
            try:
                result.set_result(_run(predictor, inputs))
            except BaseException as exc:  # the caller gets it from result()
                result.set_exception(exc)
        del predictor

    def submit(self, inputs: list[np.ndarray]) -> Future:
        result: Future = Future()
        self._jobs.put((inputs, result))
        return result

    def stop(self) -> None:
        self._jobs.put(None)


class PredictorPool:
    """N predictors of one model, lent out one caller at a time.

    Each predictor is created and run on its own thread (see :class:`_PredictorThread`);
    ``borrow()`` blocks until one is free and yields a :class:`PredictorLease`; ``run()``
    borrows, feeds the inputs in the model's input order and returns the outputs in its
    output order. Construction loads the model ``size`` times, one predictor after the
    other (each created on the thread that will run it), so ``size`` runs can then proceed
    in parallel. Blocks until every predictor is loaded; re-raises the first load error.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        options: RuntimeOptions | None = None,
        size: int = 1,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"pool size must be a positive integer, got {size!r}")
        self.model_dir = Path(model_dir)
        find_model_files(self.model_dir)  # fail fast, before starting threads
        self.options = options or RuntimeOptions()
        self._workers: list[_PredictorThread] = []
        try:
            for n in range(size):
                name = f"paddle-{self.model_dir.name}-{n}"
                self._workers.append(_PredictorThread(self.model_dir, self.options, name))
        except BaseException:
            for worker in self._workers:
                worker.stop()
            raise
        self._free: queue.SimpleQueue[_PredictorThread] = queue.SimpleQueue()
        for worker in self._workers:
            self._free.put(worker)
        self._closed = False
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self._workers)

    def input_names(self) -> list[str]:
        return list(self._workers[0].input_names)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[PredictorLease]:
        """Lend one predictor for the block; blocks while all are in use."""
        if self._closed:
            raise RuntimeError(f"predictor pool for {str(self.model_dir)!r} is closed")
        worker = self._free.get()
        try:
            yield PredictorLease(worker)
        finally:
            self._free.put(worker)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one batch on a borrowed predictor; returns the model's outputs. Blocks."""
        with self.borrow() as predictor:
            return predictor.run(inputs)

    def close(self) -> None:
        """Stop the predictor threads; idempotent. Runs already queued finish first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for worker in self._workers:
            worker.stop()
