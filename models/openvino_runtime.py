"""OpenVINO as a :mod:`models.runtime` engine for the same exported Paddle model directories.

OpenVINO's Paddle frontend reads a legacy ``inference.pdmodel`` + ``inference.pdiparams``
directly (no conversion step); it does not read PIR programs (``inference.json``), so a
directory may instead hold an ``inference.onnx`` (e.g. from paddle2onnx), which is read in
preference to the program files. Compiled models are cached under ``cache_dir`` (the
server passes ``<data_dir>/compiled/<model>``), so a restart loads the compiled blob
instead of compiling again; compiling holds a lock on that directory, so workers starting
together compile once and share the blob.

Precision is always set (``f32`` unless the model asks for ``bf16``): left to itself,
OpenVINO picks bf16 on CPUs with bf16 units, so the same image could read (and bill)
differently from one machine to the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.runtime import RuntimeOptions

__all__ = ["OpenVinoEngine", "openvino_available", "openvino_model_file"]

_core: Any = None
_core_lock = threading.Lock()


def openvino_available() -> bool:
    """True when the ``openvino`` package imports."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_model_file(model_dir: Path) -> Path:
    """The file OpenVINO reads for ``model_dir``: ``inference.onnx`` if present, else a
    legacy ``inference.pdmodel``. Raises ValueError saying why none is readable."""
    onnx = model_dir / "inference.onnx"
    if onnx.is_file():
        return onnx
    legacy = model_dir / "inference.pdmodel"
    if legacy.is_file() and (model_dir / "inference.pdiparams").is_file():
        return legacy
    if (model_dir / "inference.json").is_file():
        raise ValueError(
            f"model directory {str(model_dir)!r} holds a PIR program (inference.json), which "
            "OpenVINO cannot read; write an inference.onnx beside it with `paddle-meter "
            f"models export-onnx {model_dir}`, or use runtime: paddle"
        )
    raise FileNotFoundError(
        f"model directory {str(model_dir)!r} holds no inference.onnx or inference.pdmodel "
        "next to inference.pdiparams"
    )


def _reason(exc: BaseException) -> str:
    """OpenVINO's message without its C++ source locations ("Exception from src/...",
    "Check '...' failed at ..."), which tell an operator nothing."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [
        line
        for line in lines
        if line and not line.startswith("Exception from ") and " failed at src/" not in line
    ]
    return " ".join(kept) or type(exc).__name__


@contextlib.contextmanager
def _cache_lock(cache_dir: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on ``cache_dir`` while compiling: worker processes starting
    together would otherwise write the same blob at once (OpenVINO then fails with
    "cannot set permissions"); the second one waits and reads the first one's blob."""
    if cache_dir is None:
        yield
        return
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(cache_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _shared_core() -> Any:
    global _core
    with _core_lock:
        if _core is None:
            import openvino  # imported late: only models on this runtime pay for it

            _core = openvino.Core()
        return _core


class OpenVinoEngine:
    """One compiled model and one infer request; not thread-safe (the pool gives it one
    thread). Inputs are fed and outputs returned in the model's declared order."""

    name = "openvino"

    def __init__(self, model_dir: Path, options: RuntimeOptions) -> None:
        if options.device_type != "cpu":
            raise ValueError(
                "runtime openvino serves device 'cpu' only here; use runtime paddle for a GPU"
            )
        path = openvino_model_file(model_dir)
        properties: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": options.precision,
        }
        if options.cpu_threads is not None:
            properties["INFERENCE_NUM_THREADS"] = options.cpu_threads
        if options.cache_dir is not None:
            properties["CACHE_DIR"] = str(options.cache_dir)
        try:
            with _cache_lock(options.cache_dir):
                compiled = _shared_core().compile_model(str(path), "CPU", properties)
        except RuntimeError as exc:
            raise ValueError(f"OpenVINO cannot read {str(path)!r}: {_reason(exc)}") from None
        self._request = compiled.create_infer_request()
        self.input_names: list[str] = [port.get_any_name() for port in compiled.inputs]
        self.output_names: list[str] = [port.get_any_name() for port in compiled.outputs]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {i: np.ascontiguousarray(array) for i, array in enumerate(inputs)}
        results = self._request.infer(feeds)
        return [np.array(results[i]) for i in range(len(self.output_names))]
