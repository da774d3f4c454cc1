"""Predictor pools over a choice of inference engine: Paddle Inference or OpenVINO.

A served model's stages each hold a :class:`PredictorPool` of N predictors of one
exported model directory, all on one engine (``runtime``): :mod:`models.paddle_runtime`
(Paddle Inference, also the GPU path) or :mod:`models.openvino_runtime` (OpenVINO's Paddle
frontend reading the same files). Neither engine's predictors are safe to share between
threads, and Paddle's oneDNN kernels are not even safe to run from one thread after
another, so each predictor is created and run on its own dedicated thread; a request
borrows one for the duration of a run. Adapters, pre/post-processing, metering and
billing never see which engine runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import numpy as np

from models.openvino_runtime import OpenVinoEngine, openvino_available, openvino_model_file
from models.paddle_runtime import PaddleEngine, find_model_files

__all__ = [
    "RUNTIMES",
    "Engine",
    "PredictorLease",
    "PRECISIONS",
    "PredictorPool",
    "RuntimeOptions",
    "find_model_files",
    "resolve_runtime",
]

log = logging.getLogger("paddle_meter.models")

#: the values of a model's ``runtime`` option
RUNTIMES = ("paddle", "openvino", "auto")
#: the values of a model's ``precision`` option (bf16: OpenVINO on CPUs with bf16 units)
PRECISIONS = ("f32", "bf16")


class Engine(Protocol):
    """One loaded model on one engine; used from a single thread only."""

    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Feed ``inputs`` in input order, return the outputs in output order. Blocks."""
        ...


class RuntimeOptions:
    """How predictors are built: engine, device, CPU threads, oneDNN, compiled-model cache.

    ``runtime`` is ``"paddle"``, ``"openvino"`` or ``"auto"`` (OpenVINO where it is
    installed, the device is a CPU and it reads the model; Paddle Inference otherwise);
    ``device`` is ``"cpu"`` or ``"gpu"`` / ``"gpu:N"``; ``cpu_threads`` is the math
    library thread count per predictor (None lets the engine choose); ``cache_dir`` is
    where OpenVINO keeps compiled models (None: no cache); ``precision`` is the
    inference precision: ``f32`` (the default: text, and so the bill, is the same on every
    CPU) or ``bf16`` (OpenVINO only; faster where the CPU has bf16 units, and the text may
    differ from f32's).
    """

    def __init__(
        self,
        device: str = "cpu",
        cpu_threads: int | None = None,
        use_onednn: bool = True,
        runtime: str = "paddle",
        cache_dir: str | os.PathLike[str] | None = None,
        precision: str = "f32",
    ) -> None:
        self.device_type, self.device_id = _parse_device(device)
        if cpu_threads is not None and (not isinstance(cpu_threads, int) or cpu_threads < 1):
            raise ValueError(f"cpu_threads must be a positive integer, got {cpu_threads!r}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if runtime == "openvino" and self.device_type != "cpu":
            raise ValueError(
                "runtime openvino serves device 'cpu' only; use runtime paddle for a GPU"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "f32" and runtime == "paddle":
            raise ValueError(f"precision {precision} is available on runtime openvino only")
        self.cpu_threads = cpu_threads
        self.use_onednn = use_onednn
        self.precision = precision
        self.runtime = runtime
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def with_cache_dir(self, cache_dir: str | os.PathLike[str] | None) -> RuntimeOptions:
        """A copy of these options that caches compiled models in ``cache_dir``."""
        device = self.device_type if self.device_type == "cpu" else f"gpu:{self.device_id}"
        return RuntimeOptions(
            device, self.cpu_threads, self.use_onednn, self.runtime, cache_dir, self.precision
        )

    def __repr__(self) -> str:
        device = self.device_type if self.device_type == "cpu" else f"gpu:{self.device_id}"
        return (
            f"RuntimeOptions(runtime={self.runtime!r}, device={device!r}, "
            f"cpu_threads={self.cpu_threads!r})"
        )


def _parse_device(device: str) -> tuple[str, int]:
    if not isinstance(device, str):
        raise ValueError(f"device must be a string like 'cpu' or 'gpu:0', got {device!r}")
    kind, _, index = device.strip().lower().partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "gpu" and (not index or index.isdigit()):
        return "gpu", int(index or 0)
    raise ValueError(f"device must be 'cpu', 'gpu' or 'gpu:N', got {device!r}")


def resolve_runtime(model_dir: Path, options: RuntimeOptions) -> str:
    """The engine ``options`` give for ``model_dir``: "paddle" or "openvino".

    An explicit choice is returned as is (a model it cannot read fails when loaded);
    ``auto`` picks OpenVINO when it is installed, the device is a CPU and the directory
    holds a file it reads, else Paddle Inference, and logs why.
    """
    if options.runtime != "auto":
        return options.runtime
    if options.device_type != "cpu":
        return "paddle"
    if not openvino_available():
        log.info(
            "runtime auto: openvino is not installed; using paddle",
            extra={"model_dir": str(model_dir)},
        )
        return "paddle"
    try:
        openvino_model_file(model_dir)
    except (ValueError, FileNotFoundError) as exc:
        log.info(
            "runtime auto: using paddle", extra={"model_dir": str(model_dir), "reason": str(exc)}
        )
        return "paddle"
    return "openvino"


def _create_engine(model_dir: Path, options: RuntimeOptions, runtime: str) -> Engine:
    if runtime == "paddle" and options.precision != "f32":
        raise ValueError(
            f"precision {options.precision} is available on runtime openvino only, and "
            f"{str(model_dir)!r} runs on paddle"
        )
    if runtime == "openvino":
        if not openvino_available():
            raise ValueError(
                "runtime openvino needs the openvino package (pip install openvino), "
                "which is not installed; or use runtime paddle"
            )
        return OpenVinoEngine(model_dir, options)
    return PaddleEngine(model_dir, options)


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
    one dedicated thread avoids that for a queue hand-off per run (an OpenVINO infer
    request would not need it, but one pool shape for both keeps callers engine-blind).
    """

    def __init__(self, model_dir: Path, options: RuntimeOptions, runtime: str, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[np.ndarray], Future] | None] = queue.SimpleQueue()
        ready: Future = Future()
        self._thread = threading.Thread(
            target=self._serve, args=(model_dir, options, runtime, ready), name=name, daemon=True
        )
        self._thread.start()
        self.input_names, self.output_names = ready.result()  # re-raises load errors

    def _serve(self, model_dir: Path, options: RuntimeOptions, runtime: str, ready: Future) -> None:
        try:
            engine = _create_engine(model_dir, options, runtime)
        except BaseException as exc:  # handed to the constructor, which raises it
            ready.set_exception(exc)
            return
        ready.set_result((engine.input_names, engine.output_names))
        while (job := self._jobs.get()) is not None:
            inputs, result = job
            if not result.set_running_or_notify_cancel():
                continue
            try:
                if len(inputs) != len(engine.input_names):
                    raise ValueError(
                        f"model takes {len(engine.input_names)} inputs "
                        f"({engine.input_names}), got {len(inputs)}"
                    )
                result.set_result(engine.run(inputs))
            except BaseException as exc:  # the caller gets it from result()
                result.set_exception(exc)
        del engine

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
    ``runtime`` is the engine chosen for this directory (see :func:`resolve_runtime`).
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
        self.runtime = resolve_runtime(self.model_dir, self.options)
        self._workers: list[_PredictorThread] = []
        try:
            for n in range(size):
                name = f"{self.runtime}-{self.model_dir.name}-{n}"
                self._workers.append(
                    _PredictorThread(self.model_dir, self.options, self.runtime, name)
                )
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
