"""Model-output decoders of the OCR pipeline, picked by name through an explicit registry.

Three decoders: ``DBPostProcess`` (detection probability map -> text boxes),
``ClsPostProcess`` (direction classifier probabilities -> label, score) and
``CTCLabelDecode`` (recognition probabilities -> text, mean character probability).
:func:`build_postprocess` builds one from a config block ``{"name": ..., **options}``;
a name not in :data:`POSTPROCESS_REGISTRY` or an option the class does not take raises
ValueError (no ``eval``, no swallowed ``**kwargs``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import pyclipper
from shapely.geometry import Polygon

__all__ = [
    "POSTPROCESS_REGISTRY",
    "CTCLabelDecode",
    "ClsPostProcess",
    "DBPostProcess",
    "build_postprocess",
    "register_postprocess",
]

POSTPROCESS_REGISTRY: dict[str, type] = {}


def register_postprocess(cls: type) -> type:
    """Class decorator: make ``cls`` buildable by its class name."""
    POSTPROCESS_REGISTRY[cls.__name__] = cls
    return cls


def build_postprocess(config: Mapping[str, Any]) -> Callable[..., Any]:
    """Build the decoder named by ``config["name"]`` with the remaining keys as options."""
    options = dict(config)
    name = options.pop("name", None)
    cls = POSTPROCESS_REGISTRY.get(name)  # type: ignore[arg-type]
    if cls is None:
        known = ", ".join(sorted(POSTPROCESS_REGISTRY))
        raise ValueError(f"unknown postprocess {name!r}; known: {known}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{name} does not take option(s) {unknown}; it takes {sorted(accepted)}")
    return cls(**options)


@register_postprocess
class DBPostProcess:
    """Differentiable Binarization: threshold the map, one box per connected region.

    Called with the (1, 1, H, W) probability map and the original image size; returns
    an int array (N, 4, 2) of clockwise quadrilaterals in original-image pixels.
    """

    def __init__(
        self,
        thresh: float = 0.3,
        box_thresh: float = 0.6,
        max_candidates: int = 1000,
        unclip_ratio: float = 1.5,
        min_size: int = 3,
        use_dilation: bool = False,
    ) -> None:
        self.thresh = thresh
        self.box_thresh = box_thresh
        self.max_candidates = max_candidates
        self.unclip_ratio = unclip_ratio
        self.min_size = min_size
        self.dilation_kernel = np.ones((2, 2), np.uint8) if use_dilation else None

    def __call__(self, prob_map: np.ndarray, src_h: int, src_w: int) -> np.ndarray:
        pred = prob_map[0, 0]
        mask = (pred > self.thresh).astype(np.uint8)
        if self.dilation_kernel is not None:
            mask = cv2.dilate(mask, self.dilation_kernel)
        contours, _ = cv2.findContours(mask * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        map_h, map_w = pred.shape
        boxes = []
        for contour in contours[: self.max_candidates]:
            points, short_side = _mini_box(contour)
            if short_side < self.min_size:
                continue
            if _box_score_fast(pred, points) < self.box_thresh:
                continue
            expanded = _unclip(points, self.unclip_ratio)
            if expanded is None:
                continue
            box, short_side = _mini_box(expanded)
            if short_side < self.min_size + 2:
                continue
            box[:, 0] = np.clip(np.round(box[:, 0] / map_w * src_w), 0, src_w)
            box[:, 1] = np.clip(np.round(box[:, 1] / map_h * src_h), 0, src_h)
            box = box.astype(np.int32)
            # Slivers a few pixels wide after scaling hold no readable text.
            width = int(np.linalg.norm(box[0] - box[1]))
            height = int(np.linalg.norm(box[0] - box[3]))
            if width <= 3 or height <= 3:
                continue
            boxes.append(box)
        if not boxes:
            return np.zeros((0, 4, 2), np.int32)
        return np.stack(boxes)


def _mini_box(contour: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimum-area rectangle as 4 points ordered top-left, top-right, bottom-right,
    bottom-left; plus its shorter side."""
    rect = cv2.minAreaRect(contour.reshape(-1, 1, 2).astype(np.float32))
    pts = sorted(cv2.boxPoints(rect).tolist(), key=lambda p: p[0])
    left = sorted(pts[:2], key=lambda p: p[1])
    right = sorted(pts[2:], key=lambda p: p[1])
    ordered = np.array([left[0], right[0], right[1], left[1]], dtype=np.float32)
    return ordered, min(rect[1])


def _box_score_fast(pred: np.ndarray, box: np.ndarray) -> float:
    """Mean probability inside the box (over its bounding rectangle, masked)."""
    h, w = pred.shape
    xmin = int(np.clip(np.floor(box[:, 0].min()), 0, w - 1))
    xmax = int(np.clip(np.ceil(box[:, 0].max()), 0, w - 1))
    ymin = int(np.clip(np.floor(box[:, 1].min()), 0, h - 1))
    ymax = int(np.clip(np.ceil(box[:, 1].max()), 0, h - 1))
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    local = (box - np.array([xmin, ymin], np.float32)).astype(np.int32)
    cv2.fillPoly(mask, [local.reshape(-1, 1, 2)], 1)
    return float(cv2.mean(pred[ymin : ymax + 1, xmin : xmax + 1], mask)[0])


def _unclip(box: np.ndarray, ratio: float) -> np.ndarray | None:
    """Grow the shrunk text kernel back by area * ratio / perimeter (the DB paper's D')."""
    poly = Polygon(box)
    if poly.length == 0:
        return None
    distance = poly.area * ratio / poly.length
    offset = pyclipper.PyclipperOffset()
    offset.AddPath(box.astype(np.int64).tolist(), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    expanded = offset.Execute(distance)
    if len(expanded) != 1:
        return None
    return np.array(expanded[0], dtype=np.float32)


@register_postprocess
class ClsPostProcess:
    """Direction classifier output (N, labels) -> [(label, score)] per crop."""

    def __init__(self, label_list: Sequence[str] = ("0", "180")) -> None:
        self.label_list = list(label_list)

    def __call__(self, probs: np.ndarray) -> list[tuple[str, float]]:
        idx = probs.argmax(axis=1)
        return [(self.label_list[i], float(probs[n, i])) for n, i in enumerate(idx)]


@register_postprocess
class CTCLabelDecode:
    """Greedy CTC: best class per time step, merge repeats, drop blanks.

    The class table is ``blank`` + the dictionary file's lines (+ a space when
    ``use_space_char``), which is how PP-OCR rec models were trained. Returns
    [(text, score)] with score the mean probability of the kept steps (0.0 if none).
    """

    def __init__(self, character_dict_path: str | os.PathLike[str], use_space_char: bool = True):
        with open(character_dict_path, encoding="utf-8") as f:
            chars = [line.rstrip("\r\n") for line in f]
        if use_space_char:
            chars.append(" ")
        self.characters = ["<blank>", *chars]

    def __call__(self, probs: np.ndarray) -> list[tuple[str, float]]:
        if probs.shape[-1] != len(self.characters):
            raise ValueError(
                f"recognition model has {probs.shape[-1]} classes but the dictionary gives "
                f"{len(self.characters)}; rec_char_dict_path does not match rec_model_dir"
            )
        indices = probs.argmax(axis=2)
        best = probs.max(axis=2)
        results = []
        for seq, conf in zip(indices, best, strict=True):
            keep = seq != 0
            keep[1:] &= seq[1:] != seq[:-1]
            text = "".join(self.characters[i] for i in seq[keep])
            score = float(conf[keep].mean()) if keep.any() else 0.0
            results.append((text, score))
        return results
