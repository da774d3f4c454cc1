"""The PP-OCR pipeline on one decoded image: detect boxes, fix upside-down lines, read.

:class:`OcrPipeline` owns one :class:`~models.runtime.PredictorPool` per model
(det, cls, rec) and the decoders, and is safe to call from many threads at once: each
stage borrows a predictor only for its own forward pass. Each stage runs inside
``models.usage.stage`` (names from :mod:`models.stages`) so the metering core can
turn it into a child span.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import cv2
import numpy as np

from models import stages as st
from models.ocr.imaging import crop_text_box, det_input, pad_normalise_line, sort_boxes
from models.ocr.postprocess import build_postprocess
from models.runtime import PredictorPool, RuntimeOptions
from models.usage import stage

__all__ = [
    "Detected",
    "OcrLine",
    "OcrPipeline",
    "PipelineConfig",
    "rec_width",
    "set_line_attributes",
]

# Padded widths of recognition inputs grow in steps of about 5 % (multiples of 8, the
# recogniser's stride): recognition time grows with the padded width and, on CPUs, batching
# saves next to nothing, so padding is kept small (2.5 % on the test corpus, 16 % with
# 25 % steps); lines of about the same length still share a width, and so a batch.
_REC_WIDTH_STEP = 1.05
_REC_WIDTH_ALIGN = 8


@dataclasses.dataclass(frozen=True)
class OcrLine:
    """One recognised text line; ``box`` is 4 [x, y] corners clockwise from top-left."""

    text: str
    score: float
    box: list[list[int]]

    def to_dict(self) -> dict[str, object]:
        return {"text": self.text, "score": self.score, "box": self.box}


@dataclasses.dataclass
class PipelineConfig:
    """Model locations and the knobs of each stage (PaddleOCR's PP-OCRv4 defaults)."""

    det_model_dir: Path
    cls_model_dir: Path
    rec_model_dir: Path
    rec_char_dict_path: Path
    use_cls: bool = True
    det_limit_side_len: int = 960
    det_db: dict[str, object] = dataclasses.field(
        default_factory=lambda: {
            "name": "DBPostProcess",
            "thresh": 0.3,
            "box_thresh": 0.6,
            "unclip_ratio": 1.5,
            "min_size": 3,
        }
    )
    cls_thresh: float = 0.9
    cls_batch: int = 6
    cls_shape: tuple[int, int] = (48, 192)
    rec_batch: int = 6
    rec_shape: tuple[int, int] = (48, 320)
    drop_score: float = 0.5


@dataclasses.dataclass
class Detected:
    """One image after detection (and direction fixing): its boxes in reading order and
    the upright crop of each, ready for recognition."""

    boxes: list[np.ndarray]
    crops: list[np.ndarray]


class OcrPipeline:
    """Built once per served model (loads three predictor pools; blocks ~1-2 s)."""

    def __init__(self, config: PipelineConfig, runtime: RuntimeOptions, pool_size: int) -> None:
        self.config = config
        self.det_pool = PredictorPool(config.det_model_dir, runtime, pool_size)
        self.cls_pool = (
            PredictorPool(config.cls_model_dir, runtime, pool_size) if config.use_cls else None
        )
        self.rec_pool = PredictorPool(config.rec_model_dir, runtime, pool_size)
        self.det_post = build_postprocess(config.det_db)
        self.cls_post = build_postprocess({"name": "ClsPostProcess", "label_list": ["0", "180"]})
        self.rec_post = build_postprocess(
            {"name": "CTCLabelDecode", "character_dict_path": os.fspath(config.rec_char_dict_path)}
        )

    def runtimes(self) -> dict[str, str]:
        """The engine of each stage, e.g. {"det": "openvino", ...}."""
        pools = {"det": self.det_pool, "cls": self.cls_pool, "rec": self.rec_pool}
        return {stage_: pool.runtime for stage_, pool in pools.items() if pool is not None}

    def close(self) -> None:
        for pool in (self.det_pool, self.cls_pool, self.rec_pool):
            if pool is not None:
                pool.close()

    def run(self, img: np.ndarray) -> list[OcrLine]:
        """OCR one BGR image; returns lines in reading order. Blocks."""
        detected = self.detect(img)
        if not detected.crops:
            return []
        with stage(st.STAGE_OCR_REC, {st.OCR_CROPS: len(detected.crops)}) as span:
            lines = self.lines(detected, self.recognise(detected.crops))
            set_line_attributes(span, lines)
        return lines

    def detect(self, img: np.ndarray) -> Detected:
        """Detection and direction fixing of one BGR image (stages ``ocr.det`` and
        ``ocr.cls``). Blocks."""
        h, w = img.shape[:2]
        with stage(st.STAGE_OCR_DET, {st.OCR_IMAGE_WIDTH: w, st.OCR_IMAGE_HEIGHT: h}) as span:
            prob_map = self.det_pool.run([det_input(img, self.config.det_limit_side_len)])[0]
            boxes = sort_boxes(self.det_post(prob_map, h, w))
            _set(span, st.OCR_BOXES, len(boxes))
        if not boxes:
            return Detected([], [])
        crops = [crop_text_box(img, box) for box in boxes]
        if self.cls_pool is not None:
            with stage(st.STAGE_OCR_CLS, {st.OCR_CROPS: len(crops)}) as span:
                rotated = self._classify(crops)
                _set(span, st.OCR_ROTATED, rotated)
        return Detected(boxes, crops)

    def lines(self, detected: Detected, texts: list[tuple[str, float]]) -> list[OcrLine]:
        """The lines kept from recognised ``texts`` (one per box): confident, non-empty."""
        return [
            OcrLine(text, score, box.tolist())
            for (text, score), box in zip(texts, detected.boxes, strict=True)
            if score >= self.config.drop_score and text
        ]

    def _classify(self, crops: list[np.ndarray]) -> int:
        """Turn crops read as upside down (label '180', confident) in place; returns
        how many were turned."""
        height, width = self.config.cls_shape
        order = np.argsort([c.shape[1] / c.shape[0] for c in crops])
        rotated = 0
        for start in range(0, len(order), self.config.cls_batch):
            chunk = order[start : start + self.config.cls_batch]
            batch = np.stack([pad_normalise_line(crops[i], height, width) for i in chunk])
            labels = self.cls_post(self.cls_pool.run([batch])[0])
            for i, (label, score) in zip(chunk, labels, strict=True):
                if label == "180" and score > self.config.cls_thresh:
                    crops[i] = cv2.rotate(crops[i], cv2.ROTATE_180)
                    rotated += 1
        return rotated

    def recognise(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """Read one image's crops, batching crops of the same padded width
        (:func:`rec_width`); returns (text, score) in input order. Blocks."""
        widths = [rec_width(crop, self.config) for crop in crops]
        order = sorted(range(len(crops)), key=lambda i: widths[i])
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        start = 0
        while start < len(order):
            width = widths[order[start]]
            chunk = [i for i in order[start : start + self.config.rec_batch] if widths[i] == width]
            texts = self.recognise_batch([crops[i] for i in chunk], width)
            for i, item in zip(chunk, texts, strict=True):
                results[i] = item
            start += len(chunk)
        return results

    def recognise_batch(self, crops: list[np.ndarray], width: int) -> list[tuple[str, float]]:
        """One recognition forward pass over ``crops``, each padded to ``width``. Blocks."""
        height = self.config.rec_shape[0]
        batch = np.stack([pad_normalise_line(crop, height, width) for crop in crops])
        return list(self.rec_post(self.rec_pool.run([batch])[0]))


def rec_width(crop: np.ndarray, config: PipelineConfig) -> int:
    """The width ``crop`` is padded to for recognition: the first step of a fixed ladder
    (``rec_shape``'s width, then about 5 % wider each step) that holds the crop resized
    to the input height. It depends on the crop alone, so a line's input tensor, and its
    text, is the same whichever batch it runs in."""
    height, width = config.rec_shape
    needed = math.ceil(height * crop.shape[1] / crop.shape[0])
    while width < needed:
        grown = -(-int(width * _REC_WIDTH_STEP) // _REC_WIDTH_ALIGN) * _REC_WIDTH_ALIGN
        width = max(grown, width + _REC_WIDTH_ALIGN)
    return width


def set_line_attributes(span: object, lines: list[OcrLine]) -> None:
    """The ``ocr.rec`` span's result attributes: lines kept and their characters."""
    _set(span, st.OCR_LINES, len(lines))
    _set(span, st.OCR_CHARACTERS, sum(len(line.text) for line in lines))


def _set(span: object, key: str, value: object) -> None:
    """Set an attribute on a stage span when the installed factory yields one."""
    setter = getattr(span, "set_attribute", None)
    if setter is not None:
        setter(key, value)
