"""Names of the model stages adapters report through :func:`models.usage.stage`.

The metering core turns each stage into a child span of the request span, so these are
span and span-attribute names (see docs/design.md, "Child spans for model stages").
They live here, not in ``exporters.semconv``, because adapters never import exporters;
``exporters.semconv`` re-exports the span names so all telemetry names stay findable
from one module.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ERNIE_BATCH_SIZE",
    "ERNIE_MAX_SEQ_LEN",
    "ERNIE_SEQ_LEN",
    "ERNIE_TASK",
    "OCR_BATCH_REQUESTS",
    "OCR_BOXES",
    "OCR_CHARACTERS",
    "OCR_CROPS",
    "OCR_IMAGE_HEIGHT",
    "OCR_IMAGE_WIDTH",
    "OCR_LINES",
    "OCR_REC_WIDTH",
    "OCR_ROTATED",
    "STAGE_ERNIE_INFER",
    "STAGE_ERNIE_TOKENIZE",
    "STAGE_OCR_CLS",
    "STAGE_OCR_DET",
    "STAGE_OCR_REC",
    "STAGE_OCR_REC_BATCH",
]

# --- stage (child span) names ----------------------------------------------------------
STAGE_OCR_DET: Final = "ocr.det"
STAGE_OCR_CLS: Final = "ocr.cls"
STAGE_OCR_REC: Final = "ocr.rec"
# One recognition forward pass over crops of one or more requests (cross-request batching);
# a root span linking to each request it served.
STAGE_OCR_REC_BATCH: Final = "ocr.rec.batch"
STAGE_ERNIE_TOKENIZE: Final = "ernie.tokenize"
STAGE_ERNIE_INFER: Final = "ernie.infer"

# --- stage attributes ------------------------------------------------------------------
OCR_IMAGE_WIDTH: Final = "ocr.image.width"
OCR_IMAGE_HEIGHT: Final = "ocr.image.height"
OCR_BOXES: Final = "ocr.boxes"
OCR_CROPS: Final = "ocr.crops"
OCR_ROTATED: Final = "ocr.rotated"
OCR_LINES: Final = "ocr.lines"
OCR_CHARACTERS: Final = "ocr.characters"
OCR_BATCH_REQUESTS: Final = "ocr.batch.requests"
OCR_REC_WIDTH: Final = "ocr.rec.width"
ERNIE_MAX_SEQ_LEN: Final = "ernie.max_seq_len"
ERNIE_BATCH_SIZE: Final = "ernie.batch_size"
ERNIE_SEQ_LEN: Final = "ernie.seq_len"
ERNIE_TASK: Final = "ernie.task"
