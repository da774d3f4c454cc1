"""Convert an exported Paddle model directory for OpenVINO: ``inference.onnx`` beside it.

OpenVINO reads legacy ``inference.pdmodel`` programs directly but not PIR programs
(``inference.json``), which is what paddle 3.x's ``paddle.jit.save`` writes (PaddleNLP's
ERNIE exports included; forcing the legacy format with ``FLAGS_enable_pir_api=0`` makes
``to_static`` fail on ERNIE's attention under paddle 3.3). paddle2onnx converts either
format; :func:`export_onnx` writes ``inference.onnx`` into the model directory, where
``runtime: openvino`` (and ``auto``) picks it up, and then checks that the converted model
answers like the original on a random batch before it returns.

Used by ``paddle-meter models export-onnx DIR``; the server never converts on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.paddle_runtime import find_model_files
from models.runtime import PredictorPool, RuntimeOptions

__all__ = ["OnnxExport", "export_onnx"]

# The token id range and shape of the check batch (ERNIE inputs: int64 ids, token types).
_CHECK_SHAPE = (2, 16)
_CHECK_VOCAB = 100
# Converted outputs must match the original's to this (f32 noise is ~1e-6).
_CHECK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class OnnxExport:
    """Where the ONNX file went and how closely it matched the original."""

    path: Path
    max_abs_diff: float


def export_onnx(model_dir: str | os.PathLike[str], *, check: bool = True) -> OnnxExport:
    """Write ``model_dir/inference.onnx`` with paddle2onnx. Blocks (seconds for ERNIE
    base). With ``check`` (for token-id models such as ERNIE: int64 inputs), both runtimes
    run the same batch and a difference over 1e-3 raises ValueError (the file is removed).
    Raises ValueError when paddle2onnx is not installed or fails."""
    directory = Path(model_dir)
    program, params = find_model_files(directory)
    try:
        import paddle2onnx
    except ImportError:
        raise ValueError(
            "paddle2onnx is not installed (pip install paddle2onnx); it converts the model"
        ) from None
    target = directory / "inference.onnx"
    try:
        paddle2onnx.export(
            str(program), str(params), str(target), opset_version=14, enable_onnx_checker=True
        )
    except Exception as exc:  # paddle2onnx raises bare Exceptions with its own text
        target.unlink(missing_ok=True)
        raise ValueError(f"paddle2onnx could not convert {str(program)!r}: {exc}") from None
    if not target.is_file():
        raise ValueError(f"paddle2onnx wrote no {str(target)!r}")
    diff = _compare(directory) if check else float("nan")
    if check and not diff <= _CHECK_TOLERANCE:
        target.unlink(missing_ok=True)
        raise ValueError(
            f"the ONNX model differs from the Paddle model by up to {diff:g} on a check "
            "batch; not kept"
        )
    return OnnxExport(target, diff)


def _compare(directory: Path) -> float:
    """Largest absolute output difference, Paddle Inference vs OpenVINO (ONNX), on one
    random batch of token ids (token-type inputs all 0)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, _CHECK_VOCAB, _CHECK_SHAPE).astype(np.int64)
    types = np.zeros(_CHECK_SHAPE, np.int64)
    outputs = []
    for runtime in ("paddle", "openvino"):
        pool = PredictorPool(directory, RuntimeOptions(runtime=runtime), 1)
        try:
            outputs.append(pool.run([types if "type" in n else ids for n in pool.input_names()]))
        finally:
            pool.close()
    paddle_out, openvino_out = outputs
    if len(paddle_out) != len(openvino_out):
        return float("inf")
    return max(float(np.abs(a - b).max()) for a, b in zip(paddle_out, openvino_out, strict=True))
