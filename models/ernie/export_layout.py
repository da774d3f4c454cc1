"""What an ERNIE model directory holds beyond PaddleNLP's own export, and how it is read.

PaddleNLP's export layout is the program (``inference.pdmodel`` or ``inference.json``),
``inference.pdiparams`` and the tokenizer files (vocab.txt, tokenizer_config.json,
special_tokens_map.json). paddle-meter adds one optional side file, :data:`META_FILE`,
that the adapter reads at load and :mod:`models.ernie.demo` writes:

- ``labels``: class names in logit order (else labels are the logit indices);
- ``outputs``: the program's output names in order (``logits``, ``pooled_output``);
- ``max_position_embeddings``: the model's position limit, checked against max_seq_len.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["META_FILE", "read_meta"]

#: The adapter's side file: labels, output order, limits.
META_FILE = "paddle_meter.json"


def read_meta(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The side file of ``model_dir`` as a dict; ``{}`` when there is none. Blocks.

    Raises ValueError when the file exists but is not a JSON object.
    """
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(meta).__name__}")
    return meta
