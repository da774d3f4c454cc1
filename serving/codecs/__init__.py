"""Per-model-kind translation between protocol payloads and adapter inputs/results.

A codec knows what one kind of model takes and returns; the frontends know the protocols.
Picked from an explicit registry by the model's ``kind`` (no dynamic name lookup).
"""

from __future__ import annotations

import importlib
from typing import Any

from serving.codecs.base import Codec, OutputTensor

__all__ = ["Codec", "OutputTensor", "codec_for_kind"]

_CODECS = {
    "ocr": ("serving.codecs.ocr", "OcrCodec"),
    "ernie": ("serving.codecs.ernie", "ErnieCodec"),
}


def codec_for_kind(kind: str, adapter: Any = None) -> Codec:
    """Return a codec for a model kind (bound to its adapter); ValueError names the kinds."""
    try:
        module_name, class_name = _CODECS[kind]
    except KeyError:
        raise ValueError(
            f"unknown model kind {kind!r}; known kinds: {', '.join(_CODECS)}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)(adapter)
