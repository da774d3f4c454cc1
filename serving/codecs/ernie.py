"""ERNIE payloads: text (and an optional second text) in; label/logits or an embedding out.

OIP: inputs ``text`` BYTES [B] and optional ``text_pair`` BYTES [B] (UTF-8); outputs for a
classifier ``label`` BYTES [B], ``score`` FP32 [B], ``logits`` FP32 [B, labels], for an
embedder ``embedding`` FP32 [B, hidden]; both add ``input_tokens`` INT64 [B] (the billed
count) and ``truncated`` BOOL [B]. Pipeline: keys ``text`` / ``text_pair``; response keys
``label``, ``score``, ``logits`` (JSON) or ``embedding`` (JSON), ``input_tokens``,
``truncated``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serving.codecs.base import Codec, OutputTensor, bytes_elements, require_pipeline_key
from serving.errors import ServingError

__all__ = ["ErnieCodec"]


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServingError(
            "invalid_argument", f"{where} is not valid UTF-8 (byte {exc.start}): send UTF-8 text"
        ) from None


class ErnieCodec(Codec):
    operation = "text_classification"

    @property
    def _task(self) -> str:
        return getattr(self.adapter, "task", "text_classification")

    def oip_inputs(self) -> list[dict[str, Any]]:
        return [
            {"name": "text", "datatype": "BYTES", "shape": [-1]},
            {"name": "text_pair", "datatype": "BYTES", "shape": [-1]},
        ]

    def oip_outputs(self) -> list[dict[str, Any]]:
        common = [
            {"name": "input_tokens", "datatype": "INT64", "shape": [-1]},
            {"name": "truncated", "datatype": "BOOL", "shape": [-1]},
        ]
        if self._task == "embeddings":
            return [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}, *common]
        return [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, -1]},
            *common,
        ]

    def _items(self, texts: Sequence[str], pairs: Sequence[str] | None) -> list[Any]:
        from models.ernie.adapter import ErnieInput

        if not texts:
            raise ServingError("invalid_argument", "input 'text' holds no text")
        if pairs is not None and len(pairs) != len(texts):
            raise ServingError(
                "invalid_argument",
                f"{len(texts)} texts but {len(pairs)} text_pairs; send one per text",
            )
        return [ErnieInput(t, pairs[i] if pairs is not None else None) for i, t in enumerate(texts)]

    def from_oip(self, inputs: Mapping[str, np.ndarray]) -> tuple[list[Any], list[bytes]]:
        unknown = sorted(set(inputs) - {"text", "text_pair"})
        if "text" not in inputs or unknown:
            raise ServingError(
                "invalid_argument",
                "inputs must be 'text' (BYTES, UTF-8) and optionally 'text_pair'; "
                f"got {sorted(inputs) or 'none'}",
            )
        texts = [
            _text(v, f"input 'text'[{i}]")
            for i, v in enumerate(bytes_elements(inputs, "text", "UTF-8 text"))
        ]
        pairs = None
        if "text_pair" in inputs:
            pairs = [
                _text(v, f"input 'text_pair'[{i}]")
                for i, v in enumerate(bytes_elements(inputs, "text_pair", "UTF-8 text"))
            ]
        return self._items(texts, pairs), [t.encode() for t in texts + (pairs or [])]

    def to_oip(self, results: Sequence[Any]) -> list[OutputTensor]:
        tokens = np.array([r.input_tokens for r in results], dtype=np.int64)
        truncated = np.array([r.truncated for r in results], dtype=np.bool_)
        tail = [
            OutputTensor("input_tokens", "INT64", tokens),
            OutputTensor("truncated", "BOOL", truncated),
        ]
        if self._task == "embeddings":
            return [
                OutputTensor(
                    "embedding", "FP32", np.array([r.embedding for r in results], dtype=np.float32)
                ),
                *tail,
            ]
        return [
            OutputTensor(
                "label", "BYTES", np.array([r.label or "" for r in results], dtype=np.object_)
            ),
            OutputTensor("score", "FP32", np.array([r.score for r in results], dtype=np.float32)),
            OutputTensor("logits", "FP32", np.array([r.logits for r in results], dtype=np.float32)),
            *tail,
        ]

    def from_pipeline(self, fields: Mapping[str, str]) -> tuple[list[Any], list[bytes]]:
        require_pipeline_key(fields, "text", "the text", " (optionally 'text_pair')")
        pair = fields.get("text_pair")
        pairs = [pair] if pair is not None else None
        return self._items([fields["text"]], pairs), [
            fields["text"].encode(),
            *(p.encode() for p in pairs or []),
        ]

    def content(self, items: Sequence[Any], results: Sequence[Any]) -> str | None:
        return "\n".join(
            i.text if i.text_pair is None else f"{i.text}\t{i.text_pair}" for i in items
        )

    def to_pipeline(self, results: Sequence[Any]) -> dict[str, str]:
        (result,) = results
        out: dict[str, str] = {}
        if self._task == "embeddings":
            out["embedding"] = json.dumps(result.embedding)
        else:
            out["label"] = result.label or ""
            out["score"] = f"{result.score:.6f}"
            out["logits"] = json.dumps(result.logits)
        out["input_tokens"] = str(result.input_tokens)
        out["truncated"] = "true" if result.truncated else "false"
        return out
