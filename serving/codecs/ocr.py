"""OCR payloads: image or PDF file bytes in; recognised lines of {text, score, box} out.

OIP: input ``image`` BYTES [B] (file bytes; REST JSON may carry them base64-encoded), outputs
``text`` BYTES [B] (the lines joined with newlines) and ``result`` BYTES [B] (JSON lines).
Pipeline: key ``image`` = base64 of the file, response key ``res`` = a Python list literal of
``[text, box_points]`` items, as Paddle Serving's OCR pipeline example client expects.

A PDF (told by its ``%PDF-`` magic) is OCRed page by page. Its OIP ``result`` lines carry
``page`` (1-based) and the document ``pages`` (``[{"width", "height"}]`` in pixels as
rendered); the pipeline answer adds the key ``page``: a list literal of each ``res`` item's
page number, in the same order. Image answers are unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serving.codecs.base import Codec, OutputTensor, bytes_elements, require_pipeline_key
from serving.errors import ServingError

__all__ = ["OcrCodec"]


def _b64decode(value: str, where: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServingError(
            "invalid_argument",
            f"{where} is not valid base64 ({exc}); send base64 of the image or PDF file",
        ) from exc


def _is_pdf(result: Any) -> bool:
    return getattr(result, "kind", "image") == "pdf"


def _lines(result: Any) -> list[dict[str, Any]]:
    pdf = _is_pdf(result)
    return [
        {"text": line["text"], "score": round(float(line["score"]), 5), "box": line["box"]}
        | ({"page": line["page"]} if pdf else {})
        for line in result.lines
    ]


def _oip_document(result: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"lines": _lines(result)}
    if _is_pdf(result):
        document["pages"] = [{"width": w, "height": h} for w, h in result.page_sizes]
    return document


class OcrCodec(Codec):
    operation = "ocr"

    def oip_inputs(self) -> list[dict[str, Any]]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def oip_outputs(self) -> list[dict[str, Any]]:
        return [
            {"name": "text", "datatype": "BYTES", "shape": [-1]},
            {"name": "result", "datatype": "BYTES", "shape": [-1]},
        ]

    def from_oip(self, inputs: Mapping[str, np.ndarray]) -> tuple[list[Any], list[bytes]]:
        if "image" not in inputs:
            raise ServingError(
                "invalid_argument",
                f"missing input 'image' (BYTES: the image or PDF file's bytes); got {sorted(inputs) or 'none'}",
            )
        images: list[bytes] = []
        for i, item in enumerate(bytes_elements(inputs, "image", "the image file's bytes")):
            if isinstance(item, str):  # REST JSON without the binary extension: base64 text
                images.append(_b64decode(item, f"input 'image'[{i}]"))
            else:
                images.append(bytes(item))
        if not images:
            raise ServingError("invalid_argument", "input 'image' holds no image")
        return images, images

    def to_oip(self, results: Sequence[Any]) -> list[OutputTensor]:
        texts = np.array(
            ["\n".join(line["text"] for line in _lines(r)) for r in results], dtype=np.object_
        )
        payloads = np.array(
            [json.dumps(_oip_document(r), ensure_ascii=False) for r in results],
            dtype=np.object_,
        )
        return [OutputTensor("text", "BYTES", texts), OutputTensor("result", "BYTES", payloads)]

    def from_pipeline(self, fields: Mapping[str, str]) -> tuple[list[Any], list[bytes]]:
        value = require_pipeline_key(fields, "image", "base64 of the image file")
        if not value:
            raise ServingError(
                "invalid_argument", "key 'image' is empty: send base64 of the image file"
            )
        image = _b64decode(value, "key 'image'")
        return [image], [image]

    def to_pipeline(self, results: Sequence[Any]) -> dict[str, str]:
        # The example client eval()s this value, so it must be a plain Python literal.
        items = [
            [line["text"], [list(map(int, p)) for p in line["box"]]]
            for r in results
            for line in _lines(r)
        ]
        out = {"res": repr(items)}
        if any(_is_pdf(r) for r in results):
            out["page"] = repr([line["page"] for r in results for line in r.lines])
        return out

    def content(self, items: Sequence[Any], results: Sequence[Any]) -> str | None:
        return "\n".join(line["text"] for r in results for line in _lines(r))
