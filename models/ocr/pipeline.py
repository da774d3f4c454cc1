"""The PP-OCR pipeline on one decoded image: detect boxes, fix upside-down lines, read.

:class:`OcrPipeline` owns one :class:`~models.paddle_runtime.PredictorPool` per model
(det, cls, rec) and the decoders, and is safe to call from many threads at once: each
stage borrows a predictor only for its own forward pass. Each stage runs inside
``models.usage.stage`` (names from :mod:`models.stages`) so the metering core can
turn it into a child span.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cv2
import numpy as np

from models import stages as st
from models.ocr.imaging import crop_text_box, det_input, pad_normalise_line, sort_boxes
from models.ocr.postprocess import build_postprocess
from models.paddle_runtime import PredictorPool, RuntimeOptions
from models.usage import stage

__all__ = ["OcrLine", "OcrPipeline", "PipelineConfig"]


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

    def close(self) -> None:
        for pool in (self.det_pool, self.cls_pool, self.rec_pool):
            if pool is not None:
                pool.close()

    def run(self, img: np.ndarray) -> list[OcrLine]:
        """OCR one BGR image; returns lines in reading order. Blocks."""
        h, w = img.shape[:2]
        with stage(st.STAGE_OCR_DET, {st.OCR_IMAGE_WIDTH: w, st.OCR_IMAGE_HEIGHT: h}) as span:
            prob_map = self.det_pool.run([det_input(img, self.config.det_limit_side_len)])[0]
            boxes = sort_boxes(self.det_post(prob_map, h, w))
            _set(span, st.OCR_BOXES, len(boxes))
        if not boxes:
            return []
        crops = [crop_text_box(img, box) for box in boxes]
        if self.cls_pool is not None:
            with stage(st.STAGE_OCR_CLS, {st.OCR_CROPS: len(crops)}) as span:
                rotated = self._classify(crops)
                _set(span, st.OCR_ROTATED, rotated)
        with stage(st.STAGE_OCR_REC, {st.OCR_CROPS: len(crops)}) as span:
            texts = self._recognise(crops)
            lines = [
                OcrLine(text, score, box.tolist())
                for (text, score), box in zip(texts, boxes, strict=True)
                if score >= self.config.drop_score and text
            ]
            _set(span, st.OCR_LINES, len(lines))
            _set(span, st.OCR_CHARACTERS, sum(len(line.text) for line in lines))
        return lines

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

    def _recognise(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """Read crops in batches of similar aspect ratio (less padding per batch), each
        batch padded to its widest member; returns (text, score) in input order."""
        height, base_width = self.config.rec_shape
        ratios = [c.shape[1] / c.shape[0] for c in crops]
        order = np.argsort(ratios)
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        for start in range(0, len(order), self.config.rec_batch):
            chunk = order[start : start + self.config.rec_batch]
            max_ratio = max(base_width / height, *(ratios[i] for i in chunk))
            width = int(height * max_ratio)
            batch = np.stack([pad_normalise_line(crops[i], height, width) for i in chunk])
            decoded = self.rec_post(self.rec_pool.run([batch])[0])
            for i, item in zip(chunk, decoded, strict=True):
                results[i] = item
        return results


def _set(span: object, key: str, value: object) -> None:
    """Set an attribute on a stage span when the installed factory yields one."""
    setter = getattr(span, "set_attribute", None)
    if setter is not None:
        setter(key, value)
