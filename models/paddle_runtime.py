"""Paddle Inference as a :mod:`models.runtime` engine, and where exported models live.

Configuration follows what is fast and stable on paddlepaddle 3.3 CPU builds for the
legacy ``.pdmodel`` exports: oneDNN on, IR optimisation on, and the new IR / new executor
off (PIR crashes on these programs). This is also the GPU path (``device: gpu:N``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.runtime import RuntimeOptions

__all__ = ["PaddleEngine", "create_predictor", "find_model_files"]

# oneDNN caches one set of primitives per input shape; OCR inputs vary in shape, so
# an unbounded cache grows without limit. PaddleOCR uses the same bound.
_ONEDNN_CACHE_CAPACITY = 10


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


class PaddleEngine:
    """One Paddle Inference predictor; not thread-safe (the pool gives it one thread)."""

    name = "paddle"

    def __init__(self, model_dir: Path, options: RuntimeOptions) -> None:
        self._predictor = create_predictor(model_dir, options)
        self.input_names: list[str] = list(self._predictor.get_input_names())
        self.output_names: list[str] = list(self._predictor.get_output_names())

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        predictor = self._predictor
        for name, array in zip(self.input_names, inputs, strict=True):
            predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(array))
        predictor.run()
        return [predictor.get_output_handle(n).copy_to_cpu() for n in self.output_names]
